//! A scripted fault server: a real axum HTTP server on loopback that answers each
//! `POST /v1/metrics` from a script (then a rule, then 200) and records what it received.

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Envelope, Event, Fields};

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub auth: Option<String>,
    pub gzip: bool,
    /// The (decompressed) body bytes.
    pub raw: Vec<u8>,
    pub body: Value,
    /// What the server answered.
    pub status: u16,
}

impl Received {
    pub fn events(&self) -> Vec<Value> {
        self.body["events"].as_array().cloned().unwrap_or_default()
    }

    pub fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

type Rule = Arc<dyn Fn(&Received) -> Option<Reply> + Send + Sync>;

struct St {
    script: Mutex<VecDeque<Reply>>,
    rule: Mutex<Option<Rule>>,
    received: Mutex<Vec<Received>>,
    advertise_gzip: AtomicBool,
}

/// The running server; stops when dropped.
pub struct FaultServer {
    pub addr: SocketAddr,
    st: Arc<St>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultServer {
    /// On a free loopback port.
    pub fn start() -> FaultServer {
        FaultServer::on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// On `addr` (retrying the bind for a while: the port was just released).
    pub fn start_on(addr: SocketAddr) -> FaultServer {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(addr) {
                Ok(l) => return FaultServer::on(l),
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot bind {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn on(listener: TcpListener) -> FaultServer {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(St {
            script: Mutex::new(VecDeque::new()),
            rule: Mutex::new(None),
            received: Mutex::new(Vec::new()),
            advertise_gzip: AtomicBool::new(false),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/v1/metrics", post(handle))
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&st));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        FaultServer {
            addr,
            st,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/metrics", self.addr)
    }

    /// Queues answers, used in order before the rule.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.st.script.lock().extend(replies);
    }

    /// Answers by rule when the script is empty (`None`: 200).
    pub fn rule(&self, f: impl Fn(&Received) -> Option<Reply> + Send + Sync + 'static) {
        *self.st.rule.lock() = Some(Arc::new(f));
    }

    /// Whether every answer carries `Accept-Encoding: gzip`.
    pub fn advertise_gzip(&self, on: bool) {
        self.st.advertise_gzip.store(on, Ordering::Relaxed);
    }

    pub fn received(&self) -> Vec<Received> {
        self.st.received.lock().clone()
    }

    pub fn requests(&self) -> usize {
        self.st.received.lock().len()
    }

    /// Ids in requests answered 2xx, in order (with repeats, if any).
    pub fn accepted_ids(&self) -> Vec<String> {
        self.received()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| r.ids())
            .collect()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(State(st): State<Arc<St>>, headers: HeaderMap, body: Bytes) -> Response {
    let gzip = headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let raw = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        body.to_vec()
    };
    let mut rec = Received {
        at: Instant::now(),
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        gzip,
        body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        raw,
        status: 0,
    };
    let scripted = st.script.lock().pop_front();
    let rule = st.rule.lock().clone();
    let reply = scripted
        .or_else(|| rule.and_then(|r| r(&rec)))
        .unwrap_or(Reply::status(200));
    rec.status = reply.status;
    st.received.lock().push(rec);
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), "{}").into_response();
    for (k, v) in &reply.headers {
        resp.headers_mut().insert(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    if st.advertise_gzip.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert("accept-encoding", HeaderValue::from_static("gzip"));
    }
    resp
}

/// Waits until `cond` holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A built event of `event_type` with metadata `i`.
pub fn event(event_type: &str, i: u64) -> Event {
    Event::Built(Box::new(Envelope::new(
        event_type,
        Fields::new()
            .session_id("sess")
            .connection_id("conn")
            .meta("i", i),
    )))
}

/// A loopback port with nothing listening (bound, then released).
pub fn dead_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Captures every log line of the process (the reporter logs from its own threads).
pub fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    use std::sync::OnceLock;
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("reporter=debug,spool=debug")
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&w)))
            .try_init();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        std::io::stderr().write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn logs_contain(logs: &Arc<Mutex<Vec<u8>>>, needle: &str) -> bool {
    String::from_utf8_lossy(&logs.lock()).contains(needle)
}
