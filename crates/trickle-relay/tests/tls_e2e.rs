//! HTTPS as deployments use it, over real processes on loopback: `serve --tls-self-signed`
//! (fingerprint, `--tls-cert-out`), `serve --tls-cert/--tls-key` reloaded on SIGHUP, our
//! `publish`/`subscribe` in the three trust modes, and the Python `livepeer-gateway` clients
//! (the reference, `ssl=False`) publishing and reading JSONL through our TLS server.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use telemetry::Sink as _;

mod common;
use common::{free_addr, read_lines, relay, tail, wait_listening, wait_until, Proc};

const WAIT: Duration = Duration::from_secs(30);

/// `serve --autocreate --tls-self-signed --tls-cert-out DIR/cert.pem` on a free port, once it
/// listens: (process, https base URL, certificate file, stdout file).
fn serve_self_signed(dir: &Path) -> (Proc, String, PathBuf, PathBuf) {
    let addr = free_addr();
    let cert = dir.join("cert.pem");
    let out = dir.join("serve.out");
    let mut cmd = relay(&[
        "serve",
        "--listen",
        &addr.to_string(),
        "--autocreate",
        "--tls-self-signed",
        "--tls-cert-out",
        cert.to_str().unwrap(),
    ]);
    cmd.stdout(common::log_file(&out));
    let p = Proc::start(&mut cmd);
    wait_listening(addr);
    (p, format!("https://{addr}"), cert, out)
}

/// A blocking client for the test's own requests; an `https://` certificate is not checked.
fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap()
}

/// Creates a JSONL channel and puts `line` in its segment 0, so that a reader from 0 provably
/// reads (and is connected) before a publisher with `--reset` starts after it.
fn channel_with_warmup(url: &str, line: &str) {
    common::create_channel(url);
    let r = http()
        .post(format!("{url}/0"))
        .body(format!("{line}\n"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Runs a `trickle-relay` command with `input` on stdin: (success, stdout, stderr, duration).
fn run(args: &[&str], env: &[(&str, &str)], input: &[u8]) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let mut cmd = relay(args);
    cmd.env("RUST_LOG", "warn")
        .env_remove("TRICKLE_CA_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = wait_output(child);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Waits for a child with piped output, killing it after [`WAIT`].
fn wait_output(child: std::process::Child) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            common::signal(pid, "KILL");
            panic!("process {pid} did not finish within {WAIT:?}");
        }
    }
}

const LINES: &str = "{\"type\":\"telemetry\",\"i\":1}\n{\"type\":\"telemetry\",\"i\":2}\n{\"type\":\"telemetry\",\"i\":3}\n";

/// `subscribe --jsonl --from 0 URL` plus `flags` on a channel whose segment 0 holds a warmup
/// line; once it printed that, `publish --jsonl --reset URL` plus `flags` sends [`LINES`]. Returns
/// what the subscriber printed after the warmup, and both stderrs.
fn publish_and_subscribe(base: &str, flags: &[&str]) -> (String, String, String) {
    let url = format!("{base}/{}", uuid::Uuid::new_v4().simple());
    channel_with_warmup(&url, "{\"warmup\":true}");
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("sub.out"), dir.path().join("sub.err"));
    let mut args = vec!["subscribe", "--jsonl", "--from", "0", &url];
    args.extend_from_slice(flags);
    let mut cmd = relay(&args);
    cmd.env("RUST_LOG", "warn")
        .env_remove("TRICKLE_CA_FILE")
        .stdout(common::log_file(&out))
        .stderr(common::log_file(&err));
    let mut sub = Proc::start(&mut cmd);
    let deadline = Instant::now() + WAIT;
    while read_lines(&out).len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the subscriber did not print the warmup line; its stderr:\n{}",
            tail(&err)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = vec!["publish", "--jsonl", "--reset", &url];
    args.extend_from_slice(flags);
    let (ok, _, publish_err, _) = run(&args, &[], LINES.as_bytes());
    assert!(ok, "publish failed: {publish_err}");
    // The publisher closed the channel: the subscriber ends by itself.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = sub.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let next = http().get(format!("{url}/next")).send().map(|r| r.status());
            panic!(
                "the subscriber did not end after the publisher closed the channel (GET /next now: {next:?}); printed {:?}; its stderr:\n{}\npublisher's stderr:\n{publish_err}",
                read_lines(&out),
                tail(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "subscribe failed: {}", tail(&err));
    let printed = read_lines(&out)[1..].join("\n") + "\n";
    (printed, publish_err, std::fs::read_to_string(&err).unwrap())
}

#[test]
fn self_signed_server_prints_its_fingerprint_and_writes_the_certificate_clients_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, base, cert, out) = serve_self_signed(dir.path());
    wait_until("serve printed the fingerprint", WAIT, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("fingerprint"))
    });
    let printed = std::fs::read_to_string(&out).unwrap();
    assert!(
        printed.contains(&format!("listening on {base}")),
        "{printed}"
    );
    let der = tls::load_ca(&cert).expect("--tls-cert-out holds the certificate");
    let fingerprint = tls::fingerprint(&der[0]);
    assert!(
        printed.contains(&format!("SHA-256 fingerprint {fingerprint}")),
        "printed {printed}, certificate {fingerprint}"
    );

    // Pinned with --trickle-ca: every line, in order, both ways.
    let cert_s = cert.to_str().unwrap();
    let (got, publish_err, subscribe_err) = publish_and_subscribe(&base, &["--trickle-ca", cert_s]);
    assert_eq!(got, LINES);
    for err in [&publish_err, &subscribe_err] {
        assert!(
            !err.contains("NOT verified"),
            "verifying: no warning: {err}"
        );
    }

    // Default: accepted as the reference clients do, with one warning saying how to verify.
    let (got, publish_err, subscribe_err) = publish_and_subscribe(&base, &[]);
    assert_eq!(got, LINES);
    for err in [&publish_err, &subscribe_err] {
        assert_eq!(err.matches("NOT verified").count(), 1, "one warning: {err}");
        assert!(
            err.contains("--trickle-ca") && err.contains("--trickle-verify-tls"),
            "{err}"
        );
    }
}

#[test]
fn verifying_clients_refuse_the_self_signed_server_at_once_naming_url_reason_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, base, _cert, _) = serve_self_signed(dir.path());
    let url = format!("{base}/refused");
    common::create_channel(&url);

    // --trickle-verify-tls: the system's roots do not know a self-signed certificate.
    let (ok, _, err, took) = run(
        &["publish", "--jsonl", "--trickle-verify-tls", &url],
        &[],
        b"{\"a\":1}\n",
    );
    assert!(!ok, "publish must fail");
    assert!(err.contains("1 lines NOT delivered"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:")
            && last.contains(&format!("TLS certificate of {url}"))
            && last.contains("not among the trusted")
            && last.contains("--trickle-verify-tls"),
        "{err}"
    );
    let (ok, _, err, took_sub) = run(&["subscribe", "--trickle-verify-tls", &url], &[], b"");
    assert!(!ok, "subscribe must fail");
    assert!(
        err.contains(&format!("TLS certificate of {url}")) && err.contains("--trickle-verify-tls"),
        "{err}"
    );

    // TRICKLE_CA_FILE naming another certificate (a CA that did not sign this server's).
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let other_path = dir.path().join("other.pem");
    std::fs::write(&other_path, other.cert.pem()).unwrap();
    let env = [("TRICKLE_CA_FILE", other_path.to_str().unwrap())];
    let (ok, _, err, took_ca) = run(&["subscribe", "--jsonl", &url], &env, b"");
    assert!(!ok, "subscribe must fail");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("TLS certificate of {url}"))
            && last.contains("--trickle-ca")
            && last.contains(other_path.to_str().unwrap()),
        "{err}"
    );
    // The subscriber retries 5 times 500 ms apart and the publisher once after 500 ms, for any
    // other failure: failing faster than one retry delay shows no retry loop ran.
    for t in [took, took_sub, took_ca] {
        assert!(
            t < Duration::from_millis(2500),
            "refused at once, took {t:?}"
        );
    }
}

#[test]
fn served_certificate_is_reloaded_on_sighup_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let issue = |pinned: &str| {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let pin = dir.path().join(pinned);
        std::fs::write(&pin, ck.cert.pem()).unwrap();
        pin
    };
    let first = issue("first.pem");
    let addr = free_addr();
    let log = dir.path().join("serve.err");
    let server = Proc::spawn(
        &[
            "serve",
            "--listen",
            &addr.to_string(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        Some(&log),
    );
    wait_listening(addr);
    // Whether a client trusting only `pin` gets an HTTP answer (a 404: no such channel).
    let answers = |pin: &Path| {
        let cert = reqwest::Certificate::from_pem(&std::fs::read(pin).unwrap()).unwrap();
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .build()
            .unwrap()
            .get(format!("https://{addr}/none/0"))
            .send()
            .is_ok_and(|r| r.status() == 404)
    };
    assert!(answers(&first));

    let second = issue("second.pem");
    assert!(
        answers(&first),
        "the files alone change nothing until SIGHUP"
    );
    common::signal(server.pid(), "HUP");
    wait_until("the new certificate is served", WAIT, || answers(&second));
    assert!(!answers(&first), "the old certificate is no longer served");
    wait_until("the reload is logged", WAIT, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("TLS certificate reloaded"))
    });

    // A key that does not belong to the certificate: refused, the current one stays.
    std::fs::write(&key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    common::signal(server.pid(), "HUP");
    wait_until("the refusal is logged", WAIT, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("NOT reloaded"))
    });
    assert!(answers(&second), "still served after a bad reload");
}

/// The shared Python venv (`scripts/python-env.sh`, run by `scripts/test.sh`).
fn python() -> PathBuf {
    let venv = std::env::var_os("TRICKLE_RELAY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/python-venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "no Python test venv at {}: run scripts/python-env.sh (scripts/test.sh does)",
        venv.display()
    );
    python
}

/// The reference clients, used exactly as Scope uses them: `JSONLWriter(url)` /
/// `JSONLReader(url)`, whose aiohttp sessions are opened with `TCPConnector(ssl=False)`.
const PY_CLIENT: &str = r#"
import asyncio, json, sys
from livepeer_gateway.channel_writer import JSONLWriter
from livepeer_gateway.channel_reader import JSONLReader

async def write(url, n):
    w = JSONLWriter(url)
    for i in range(n):
        await w.write({"type": "telemetry", "i": i, "from": "python"})
    print("WRITTEN", flush=True)
    sys.stdin.readline()   # the test says when to close (DELETE) the channel
    await w.close()

async def read(url, n):
    got = 0
    async for event in JSONLReader(url)(start_seq=0):
        print(json.dumps(event, separators=(",", ":")), flush=True)
        got += 1
        if got == n:
            break

mode, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
asyncio.run(write(url, n) if mode == "write" else read(url, n))
"#;

#[test]
fn python_livepeer_gateway_clients_publish_and_read_jsonl_through_our_tls_server() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let (_server, base, cert, _) = serve_self_signed(dir.path());
    let script = dir.path().join("client.py");
    std::fs::write(&script, PY_CLIENT).unwrap();
    let n = 200;

    // Python publishes; our subscriber (pinning the certificate) reads every line.
    let py_url = format!("{base}/py-{}", uuid::Uuid::new_v4().simple());
    common::create_channel(&py_url);
    let (py_out, py_err) = (dir.path().join("write.out"), dir.path().join("write.err"));
    let mut writer = Command::new(&python);
    writer
        .arg(&script)
        .args(["write", &py_url, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(common::log_file(&py_out))
        .stderr(common::log_file(&py_err));
    let mut writer = Proc::start(&mut writer);
    wait_until("the Python writer wrote", WAIT, || {
        read_lines(&py_out).iter().any(|l| l == "WRITTEN")
            || writer.0.try_wait().is_ok_and(|s| s.is_some())
    });
    assert!(
        read_lines(&py_out).iter().any(|l| l == "WRITTEN"),
        "the Python writer failed: {}",
        tail(&py_err)
    );
    let (sub_out, sub_err) = (dir.path().join("sub.out"), dir.path().join("sub.err"));
    let mut cmd = relay(&[
        "subscribe",
        "--jsonl",
        "--from",
        "0",
        &py_url,
        "--trickle-ca",
        cert.to_str().unwrap(),
    ]);
    cmd.stdout(common::log_file(&sub_out))
        .stderr(common::log_file(&sub_err));
    let mut sub = Proc::start(&mut cmd);
    wait_until("our subscriber read every Python line", WAIT, || {
        read_lines(&sub_out).len() >= n
    });
    // Let the Python writer close (DELETE) the channel: our subscriber then ends.
    drop(writer.0.stdin.take());
    assert!(writer.wait(WAIT).success(), "{}", tail(&py_err));
    assert!(sub.wait(WAIT).success(), "{}", tail(&sub_err));
    let got = read_lines(&sub_out);
    assert_eq!(got.len(), n, "{got:?}");
    for (i, line) in got.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "telemetry", "i": i, "from": "python"})
        );
    }

    // Our publisher (default mode, as the reference) writes; the Python reader reads every line.
    let rs_url = format!("{base}/rs-{}", uuid::Uuid::new_v4().simple());
    channel_with_warmup(&rs_url, "{\"warmup\":true}");
    let (rd_out, rd_err) = (dir.path().join("read.out"), dir.path().join("read.err"));
    let mut reader = Command::new(&python);
    reader
        .arg(&script)
        .args(["read", &rs_url, &(n + 1).to_string()])
        .stdin(Stdio::null())
        .stdout(common::log_file(&rd_out))
        .stderr(common::log_file(&rd_err));
    let mut reader = Proc::start(&mut reader);
    wait_until("the Python reader read the warmup line", WAIT, || {
        !read_lines(&rd_out).is_empty() || reader.0.try_wait().is_ok_and(|s| s.is_some())
    });
    assert_eq!(
        read_lines(&rd_out),
        vec!["{\"warmup\":true}"],
        "{}",
        tail(&rd_err)
    );
    let input: String = (0..n)
        .map(|i| format!("{{\"type\":\"telemetry\",\"i\":{i},\"from\":\"rust\"}}\n"))
        .collect();
    let (ok, _, err, _) = run(
        &["publish", "--jsonl", "--reset", &rs_url],
        &[],
        input.as_bytes(),
    );
    assert!(ok, "publish failed: {err}");
    assert!(reader.wait(WAIT).success(), "{}", tail(&rd_err));
    let got = read_lines(&rd_out);
    assert_eq!(got.len(), n + 1, "{}", tail(&rd_err));
    for (i, line) in got[1..].iter().enumerate() {
        assert_eq!(
            *line,
            format!("{{\"type\":\"telemetry\",\"i\":{i},\"from\":\"rust\"}}")
        );
    }
}

/// A fresh key and self-signed certificate for 127.0.0.1 written to `dir/{name}.crt/.key`:
/// (certificate file, key file).
fn issue_files(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// The API key the test collectors accept.
const COLLECTOR_KEY: &str = "collector-tls-key";

/// `collector --tls-cert cert --tls-key key` in `dir` (output `dir/out.jsonl`, stderr
/// `dir/collector.err`), once it listens: (process, address, output file, stderr file).
fn collector_tls(dir: &Path, cert: &Path, key: &Path) -> (Proc, SocketAddr, PathBuf, PathBuf) {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{COLLECTOR_KEY}\n")).unwrap();
    let (out, log) = (dir.join("out.jsonl"), dir.join("collector.err"));
    let addr = free_addr();
    let collector = Proc::spawn(
        &[
            "collector",
            "--listen",
            &addr.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &format!("jsonl:{}", out.display()),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        Some(&log),
    );
    wait_listening(addr);
    (collector, addr, out, log)
}

#[test]
fn collector_serves_https_with_its_certificate_and_reloads_it_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = issue_files(dir.path(), "first");
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let (collector, addr, out, log) = collector_tls(dir.path(), &live_cert, &live_key);
    let url = format!("https://{addr}/v1/metrics");
    // POSTs one event with a client that trusts only `pin`: the status, or None when refused.
    let post = |pin: &Path, id: &str| {
        let cert = reqwest::Certificate::from_pem(&std::fs::read(pin).unwrap()).unwrap();
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert)
            .build()
            .unwrap()
            .post(&url)
            .bearer_auth(COLLECTOR_KEY)
            .json(&serde_json::json!({"events": [{"id": id, "type": "stream_trace", "data": {"type": "x"}}]}))
            .send()
            .ok()
            .map(|r| r.status().as_u16())
    };
    assert_eq!(post(&cert, "e1"), Some(200));
    assert!(
        reqwest::blocking::get(format!("http://{addr}/health")).is_err(),
        "plain HTTP is not served on the TLS port"
    );
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(
        printed.contains(&format!("https://{addr}/v1/metrics")),
        "{printed}"
    );
    let fingerprint = tls::fingerprint(&tls::load_ca(&cert).unwrap()[0]);
    assert!(printed.contains(&fingerprint), "{printed}");

    let (second, second_key) = issue_files(dir.path(), "second");
    std::fs::copy(&second, &live_cert).unwrap();
    std::fs::copy(&second_key, &live_key).unwrap();
    common::signal(collector.pid(), "HUP");
    wait_until("the collector serves the new certificate", WAIT, || {
        post(&second, "e2") == Some(200)
    });
    assert_eq!(post(&cert, "e3"), None, "the old certificate is gone");
    let ids: Vec<String> = common::collector_output(&out)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["e1", "e2"]);
}

/// Log lines of this test process (each test runs in its own process under nextest).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn reporter_posts_to_a_tls_collector_trusting_scope_metrics_ca_file() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("reporter=info")
        .init();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = issue_files(dir.path(), "collector");
    let (_collector, addr, out, _) = collector_tls(dir.path(), &cert, &key);
    let buffer = dir.path().join("buffer");
    let url = format!("https://{addr}/v1/metrics");
    let config = |ca: Option<&Path>| {
        let vars = [
            ("DAYDREAM_METRICS_URL", url.clone()),
            ("SCOPE_CLOUD_API_KEY", COLLECTOR_KEY.to_string()),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "50".to_string()),
            ("SCOPE_METRICS_BUFFER_PATH", buffer.display().to_string()),
            (
                "SCOPE_METRICS_CA_FILE",
                ca.map(|p| p.display().to_string()).unwrap_or_default(),
            ),
        ];
        reporter::ReporterConfig::from_env_with(|k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        })
        .unwrap()
        .with_backoff(Duration::from_millis(50), Duration::from_millis(200))
    };
    let emit = |r: &reporter::Reporter, tag: &str| -> Vec<String> {
        (0..5)
            .map(|i| {
                let e = telemetry::Event::Built(Box::new(telemetry::Envelope::new(
                    "stream_heartbeat",
                    telemetry::Fields::new().session_id(tag).meta("i", i),
                )));
                let id = e.id().into_owned();
                r.emit(e);
                id
            })
            .collect()
    };

    // Without the CA: refused like a network error, kept, retried, counted, named in the log.
    let r = reporter::Reporter::start(config(None)).unwrap();
    let mut ids = emit(&r, "without-ca");
    wait_until("refused requests are retried", WAIT, || {
        let s = r.reporter_stats();
        s.network_errors >= 2 && s.buffered == 5
    });
    let text = logs.text();
    assert!(
        text.contains(&format!("TLS certificate of {url} refused"))
            && text.contains("SCOPE_METRICS_CA_FILE"),
        "{text}"
    );
    assert!(common::collector_output(&out).is_empty());
    let stats = r.shutdown(Duration::from_millis(200));
    assert_eq!((stats.acked, stats.buffered), (0, 5), "{stats:?}");
    drop(r);

    // With it: what the first reporter kept on disk is delivered, then the new events.
    let r = reporter::Reporter::start(config(Some(&cert))).unwrap();
    ids.extend(emit(&r, "with-ca"));
    wait_until("every event delivered", WAIT, || {
        common::collector_output(&out).len() == 10
    });
    let got: Vec<String> = common::collector_output(&out)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, ids);
    r.shutdown(Duration::from_secs(5));
}
