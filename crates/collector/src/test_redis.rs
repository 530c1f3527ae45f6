//! A disposable `redis-server` for tests and benchmarks of the shared dedup.
//!
//! [`TestRedis::start`] runs the real `redis-server` (Debian's `redis-server` package;
//! `scripts/test.sh` installs it when missing) on a free loopback port, with its data in a
//! directory the caller owns and the persistence the shared dedup asks for (`appendonly yes`,
//! `appendfsync always`), and kills it when dropped. [`TestRedis::kill9`] and
//! [`TestRedis::restart`] make the outage a test needs: the restarted server reads its
//! append-only file back, as a production Redis would after a crash.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to do when `redis-server` is missing.
pub const INSTALL_HINT: &str = "`redis-server` is not installed: run scripts/test.sh (it installs Debian's \
redis-server package when missing), or `apt-get install redis-server`, or point REDIS_SERVER_BIN at one";

/// A running `redis-server`, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct TestRedis {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl TestRedis {
    /// Starts `redis-server` on a free loopback port with its files in `dir`; waits until it
    /// answers. The error names [`INSTALL_HINT`] when the binary is missing.
    pub fn start(dir: &Path) -> Result<TestRedis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let mut r = TestRedis {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: dir.to_owned(),
        };
        r.spawn()?;
        Ok(r)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The loopback address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGKILL, and reap: no shutdown save, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (it reloads its append-only file).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill9();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = std::env::var_os("REDIS_SERVER_BIN")
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "redis-server".into());
        let port = self.addr.port().to_string();
        let child = Command::new(&bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => INSTALL_HINT.to_owned(),
                _ => format!("cannot start redis-server: {e}"),
            })?;
        self.child = Some(child);
        // Answering PING (not just accepting): it may still be loading its append-only file.
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if ping(self.addr) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "redis-server exited at start ({status}); port {port} taken?"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server on {} did not answer PING within 20 s",
            self.addr
        ))
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One `PING` over a fresh connection, answered `+PONG`.
fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
