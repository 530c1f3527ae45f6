//! Helpers shared by the integration tests: real `trickle-relay` processes, free ports, waits.
//!
//! Each test binary includes this with `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod proxy;

use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for the integration tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");

/// Egress variables a developer's shell may set; removed so a test sees only what it sets.
const EGRESS_ENV: &[&str] = &[
    "SCOPE_TELEMETRY_LOG_SINK",
    "SCOPE_TELEMETRY_DISABLED",
    "DO_NOT_TRACK",
    "SCOPE_CLOUD_API_KEY",
    "SCOPE_METRICS_ENABLED",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_TOPIC",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
];

/// A `trickle-relay` command with `args`, `RUST_LOG=info`, no stdin and a clean egress
/// environment; add `.env(..)` / `.stderr(..)` before [`Proc::start`].
pub fn relay(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
    // Text logs, whatever the developer's shell asks for; a test wanting JSON sets it.
    cmd.env_remove("TRICKLE_RELAY_LOG_FORMAT");
    for var in EGRESS_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A file to send a child's stderr to (kept for the failure message).
pub fn log_file(path: &Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).expect("create log file"))
}

/// A child process killed (SIGKILL) when dropped, whatever happens to the test.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Spawns `cmd` (usually from [`relay`]).
    pub fn start(cmd: &mut Command) -> Proc {
        Proc(cmd.spawn().expect("spawn trickle-relay"))
    }

    /// `trickle-relay args` with stderr into `stderr` when given.
    pub fn spawn(args: &[&str], stderr: Option<&Path>) -> Proc {
        let mut cmd = relay(args);
        if let Some(path) = stderr {
            cmd.stderr(log_file(path));
        }
        Proc::start(&mut cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        self.0.kill().expect("kill -9");
        let _ = self.0.wait();
    }

    /// SIGTERM: a graceful shutdown.
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit on its own; fails the test after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit within {timeout:?}",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory now, in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory so far, in KiB (Linux).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid(), "VmHWM:")
    }
}

/// Sends `SIG<name>` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A loopback address nobody listens on (bound, then released).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// Polls `cond` every 20 ms; fails the test naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 20 s) until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    wait_until(
        &format!("{addr} listening"),
        Duration::from_secs(20),
        || TcpStream::connect(addr).is_ok(),
    );
}

/// `trickle-relay serve --autocreate` on `addr` (plus `extra` flags), once it listens.
pub fn serve(addr: SocketAddr, extra: &[&str]) -> Proc {
    let listen = addr.to_string();
    let mut args = vec!["serve", "--listen", &listen, "--autocreate"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args, None);
    wait_listening(addr);
    p
}

/// The non-empty lines of a file (none when it does not exist).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A JSON file (a process's `--report`), parsed.
pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The last 40 lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Creates the trickle channel `url` (as an orchestrator would) and fails the test otherwise.
/// An `https://` server's certificate is not checked (the tests' servers sign their own).
pub fn create_channel(url: &str) {
    let status = reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("HTTP client")
        .post(url)
        .header("Expect-Content", "application/jsonl")
        .send()
        .unwrap_or_else(|e| panic!("creating {url}: {e}"))
        .status();
    assert!(status.is_success(), "creating {url}: {status}");
}

/// Two fresh channel URLs on the server at `addr`, created: `(control, events)`.
pub fn create_session_channels(addr: SocketAddr) -> (String, String) {
    create_session_channels_at(&format!("http://{addr}"))
}

/// Two fresh channel URLs on the server at `base` (e.g. `https://127.0.0.1:2939`), created.
pub fn create_session_channels_at(base: &str) -> (String, String) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let control = format!("{base}/{tag}-control");
    let events = format!("{base}/{tag}-events");
    create_channel(&control);
    create_channel(&events);
    (control, events)
}

/// `trickle-relay runner` on `control`/`events` for `session`/`connection`, taking envelopes on
/// `--ingest ingest` (queue of 100,000, no log forwarding), plus `extra` flags and stderr into
/// `stderr` when given; returns once the ingest listens.
pub fn runner_with_ingest(
    (control, events): (&str, &str),
    (session, connection): (&str, &str),
    ingest: SocketAddr,
    extra: &[&str],
    stderr: Option<&Path>,
) -> Proc {
    let ingest_s = ingest.to_string();
    let mut args = vec![
        "runner",
        "--control-url",
        control,
        "--events-url",
        events,
        "--session-id",
        session,
        "--connection-id",
        connection,
        "--ingest",
        &ingest_s,
        "--queue-capacity",
        "100000",
        "--no-forward-logs",
    ];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args, stderr);
    wait_listening(ingest);
    p
}

/// Every complete line of a collector's `jsonl:` output, each asserted to be an API event (a
/// string `id` and `type`, an object `data`): anything else is garbage and fails the test. A last
/// line without its `\n` is one the running collector is still appending: not output yet.
pub fn collector_output(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("garbage in the output ({e}): {l}"));
            assert!(
                v["id"].is_string() && v["type"].is_string() && v["data"].is_object(),
                "not an event: {l}"
            );
            v
        })
        .collect()
}

/// What the client's relay annotation of an envelope looks like, undone: from an egressed line,
/// the line as the runner wrote it and the `relay_received_timestamp` the client stamped. `None`
/// unless exactly `"relayed_via":"trickle"` and `"relay_received_timestamp":"<ms>"` were spliced
/// in at the end of `data` (every other byte the same), as the spec asks.
pub fn unrelay(line: &str) -> Option<(String, u64)> {
    const VIA: &str = r#""relayed_via":"trickle","relay_received_timestamp":""#;
    let at = line.rfind(VIA)?;
    let digits_start = at + VIA.len();
    let digits_len = line[digits_start..].find('"')?;
    let received: u64 = line[digits_start..digits_start + digits_len].parse().ok()?;
    let end = digits_start + digits_len + 1;
    // The run ends `data` (its closing brace follows) and is joined by a comma unless it is alone.
    if !line[end..].starts_with('}') {
        return None;
    }
    let start = if line[..at].ends_with(',') {
        at - 1
    } else {
        at
    };
    let original = format!("{}{}", &line[..start], &line[end..]);
    let data_is_last: Value = serde_json::from_str(line).ok()?;
    (data_is_last["data"]["relayed_via"] == "trickle").then_some((original, received))
}

/// [`unrelay`], failing the test with the line when it is not a relayed envelope.
pub fn unrelay_or_fail(line: &str) -> (String, u64) {
    unrelay(line).unwrap_or_else(|| panic!("not annotated inside data as the spec asks: {line}"))
}

/// `GET url` as JSON, `None` on any failure (not up yet, not JSON): for polling endpoints.
pub fn get_json(url: &str) -> Option<Value> {
    reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .ok()?
        .json()
        .ok()
}

/// A trickle server, a session's two channels on it, and a runner taking envelopes on `ingest`.
pub struct Session {
    pub server: Proc,
    /// The trickle server's address.
    pub addr: SocketAddr,
    pub runner: Proc,
    pub control: String,
    pub events: String,
    pub ingest: SocketAddr,
}

/// Starts a [`Session`] for `session`/`connection`, ready to take events.
pub fn session_with_runner((session, connection): (&str, &str)) -> Session {
    let addr = free_addr();
    let server = serve(addr, &[]);
    let (control, events) = create_session_channels(addr);
    let ingest = free_addr();
    let runner = runner_with_ingest(
        (&control, &events),
        (session, connection),
        ingest,
        &[],
        None,
    );
    Session {
        server,
        addr,
        runner,
        control,
        events,
        ingest,
    }
}

/// The Python interpreter of the test venv (`target/python-venv`, or `$TRICKLE_RELAY_VENV`) with
/// livepeer-gateway installed; fails the test saying how to make it when it is missing.
pub fn venv_python() -> std::path::PathBuf {
    let venv = std::env::var_os("TRICKLE_RELAY_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python-venv"));
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import livepeer_gateway"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the Python test venv with livepeer-gateway is missing at {}: run scripts/python-env.sh \
         (scripts/test.sh does) and rerun",
        venv.display()
    );
    python
}

/// A Python script of `tests/python/`.
pub fn python_script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Every accounting a summary in `text` printed (`emitted E = delivered D + dropped X + queued
/// Q`, see `relay::accounting`), each asserted to add up; fails the test naming `what` if there
/// is none or one does not.
pub fn assert_accounted(what: &str, text: &str) -> Vec<relay::accounting::Accounting> {
    let found = relay::accounting::find_all(text);
    assert!(!found.is_empty(), "{what}: no accounting printed:\n{text}");
    for a in &found {
        assert!(a.balanced(), "{what}: {a} does not add up:\n{text}");
    }
    found
}

/// The `"telemetry"` accounting object of a JSON summary (`--report`, `/health`, `demo --json`),
/// asserted to add up: `(emitted, delivered, dropped, queued)`.
pub fn assert_json_accounted(what: &str, v: &Value) -> (u64, u64, u64, u64) {
    let t = &v["telemetry"];
    let n = |k: &str| {
        t[k].as_u64()
            .unwrap_or_else(|| panic!("{what}: no telemetry.{k} in {v}"))
    };
    let (e, d, x, q) = (n("emitted"), n("delivered"), n("dropped"), n("queued"));
    assert_eq!(e, d + x + q, "{what}: {t} does not add up");
    (e, d, x, q)
}

/// Deletes the trickle channel `url` (as an orchestrator ending a job does); fails the test if
/// the server answers anything but success.
pub fn delete_channel(url: &str) {
    let status = reqwest::blocking::Client::new()
        .delete(url)
        .send()
        .unwrap_or_else(|e| panic!("deleting {url}: {e}"))
        .status();
    assert!(status.is_success(), "deleting {url}: {status}");
}
