//! A TCP proxy on loopback that misbehaves on demand, for faults a real network has but loopback
//! does not: answers that come late or never, connections reset mid-request, a peer that is
//! unreachable. The peers on both sides are the real processes under test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Forwards, but holds every answer chunk this long first.
    Delay(Duration),
    /// Forwards requests; every answer is read from upstream and thrown away: the upstream acted
    /// on the request, the client never hears of it (and times out).
    LoseAnswers,
    /// Reads the start of a request, then resets (SO_LINGER 0, close: RST).
    Reset,
    /// Accepts and reads, never answers.
    Silent,
    /// Resets every connection at once, open or new: the peer is unreachable.
    Down,
}

/// What the proxy did, so far.
#[derive(Default, Debug)]
pub struct ProxyCounts {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Answer chunks held back (`Delay`).
    pub delayed: AtomicU64,
    /// Answer chunks thrown away (`LoseAnswers`).
    pub lost_answers: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
    /// Connections accepted and never answered (`Silent`).
    pub silent: AtomicU64,
}

/// A TCP proxy on loopback that can delay, reset or swallow connections.
pub struct FaultProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    mode: tokio::sync::watch::Sender<Mode>,
    /// What it did.
    pub counts: Arc<ProxyCounts>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0: any), forwarding to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> FaultProxy {
        let (mode, mode_rx) = tokio::sync::watch::channel(Mode::Pass);
        let counts = Arc::new(ProxyCounts::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let c = counts.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        c.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(proxy_conn(sock, upstream, mode_rx.clone(), c.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_background();
        });
        let addr = addr_rx.recv().unwrap();
        FaultProxy {
            addr,
            mode,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Switches to `mode`: new connections and open ones follow it.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// One of [`FaultProxy::counts`], read.
    pub fn count(&self, what: &AtomicU64) -> u64 {
        what.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.set(Mode::Down);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Closes `sock` with an RST rather than a FIN (linger 0 never blocks the thread).
#[allow(deprecated)]
fn rst(sock: tokio::net::TcpStream) {
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
}

async fn proxy_conn(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    mut mode: tokio::sync::watch::Receiver<Mode>,
    counts: Arc<ProxyCounts>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    let start = *mode.borrow_and_update();
    match start {
        Mode::Down => return rst(client),
        Mode::Reset => {
            // Mid-request: some of it was read, then the connection is reset.
            let _ = tokio::time::timeout(Duration::from_secs(2), client.read(&mut buf)).await;
            counts.resets.fetch_add(1, Ordering::Relaxed);
            return rst(client);
        }
        Mode::Silent => {
            counts.silent.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    r = client.read(&mut buf) => if !matches!(r, Ok(n) if n > 0) { return },
                    changed = mode.changed() => {
                        let m = *mode.borrow();
                        if changed.is_err() || m != Mode::Silent { return rst(client) }
                    }
                }
            }
        }
        Mode::Pass | Mode::Delay(_) | Mode::LoseAnswers => {}
    }
    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
        return rst(client);
    };
    let mut ubuf = vec![0u8; 64 * 1024];
    let broken = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        loop {
            tokio::select! {
                r = cr.read(&mut buf) => match r {
                    Ok(n) if n > 0 => if uw.write_all(&buf[..n]).await.is_err() { break false },
                    _ => break false,
                },
                r = ur.read(&mut ubuf) => match r {
                    Ok(n) if n > 0 => {
                        let m = *mode.borrow();
                        if let Mode::Delay(d) = m {
                            counts.delayed.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(d).await;
                        }
                        if m == Mode::LoseAnswers {
                            counts.lost_answers.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if cw.write_all(&ubuf[..n]).await.is_err() { break false }
                    }
                    _ => break false,
                },
                changed = mode.changed() => {
                    let m = *mode.borrow();
                    if changed.is_err() || matches!(m, Mode::Down | Mode::Reset | Mode::Silent) {
                        break true;
                    }
                }
            }
        }
    };
    if broken {
        counts.resets.fetch_add(1, Ordering::Relaxed);
        rst(client);
        rst(up);
    }
}
