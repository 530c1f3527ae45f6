//! `--log-format json` (env `TRICKLE_RELAY_LOG_FORMAT`): every stderr line of every command is a
//! JSON object with timestamp, level, target and message; the log sink's `TELEMETRY ...` line is
//! its `message` byte for byte; and no run writes ANSI escape codes unless stderr is a terminal
//! (and `NO_COLOR` is unset). Real processes over loopback.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{free_addr, read_lines, relay, wait_listening, Proc};

/// Every line of a captured stderr, parsed; a line that is not a JSON object with the four keys
/// fails the test with the line.
fn json_lines(what: &str, path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(!text.is_empty(), "{what}: wrote nothing on stderr");
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: a stderr line is not JSON ({e}): {line:?}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(v[key].is_string(), "{what}: no string `{key}` in {line}");
            }
            v
        })
        .collect()
}

/// `trickle-relay args` with stderr into `dir/name.err`, in JSON by the flag or (`by_env`) by
/// the environment variable.
fn spawn_json(dir: &Path, name: &str, args: &[&str], by_env: bool) -> Proc {
    let mut cmd = relay(args);
    if by_env {
        cmd.env("TRICKLE_RELAY_LOG_FORMAT", "json");
    } else {
        cmd.arg("--log-format").arg("json");
    }
    cmd.stderr(common::log_file(&dir.join(format!("{name}.err"))));
    cmd.stdout(Stdio::null());
    Proc::start(&mut cmd)
}

fn has_message(lines: &[Value], pred: impl Fn(&str) -> bool) -> bool {
    lines
        .iter()
        .any(|l| l["message"].as_str().is_some_and(&pred))
}

#[test]
fn every_stderr_line_of_every_command_is_json_and_the_telemetry_line_is_its_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let addr = free_addr();
    let listen = addr.to_string();
    let mut server = spawn_json(
        d,
        "serve",
        &["serve", "--listen", &listen, "--autocreate"],
        true,
    );
    wait_listening(addr);
    let (control, events) = common::create_session_channels(addr);
    let emitted = d.join("emitted.jsonl");
    let (session, connection) = ("sess-json", "conn-json");
    let mut runner = spawn_json(
        d,
        "runner",
        &[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            session,
            "--connection-id",
            connection,
            "--heartbeat-ms",
            "50",
            "--emitted-file",
            emitted.to_str().unwrap(),
        ],
        false,
    );
    let mut client = spawn_json(
        d,
        "client",
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            session,
            "--connection-id",
            connection,
            "--egress",
            "log",
            "--start-stream",
            r#"{"pipeline_id":"passthrough"}"#,
            "--duration-secs",
            "1.5",
            "--http",
            &free_addr().to_string(),
        ],
        true,
    );
    // The client stops the stream and closes the control channel; the runner then ends too.
    assert!(client.wait(Duration::from_secs(60)).success());
    assert!(runner.wait(Duration::from_secs(30)).success());

    // publish and subscribe: a line through a channel, then a channel that does not exist (an
    // error exit, whose error line is JSON too).
    let chan = format!("http://{addr}/json-logs");
    let mut publish = relay(&["publish", &chan, "--log-format", "json"]);
    publish
        .stdin(Stdio::piped())
        .stderr(common::log_file(&d.join("publish.err")));
    let mut publish = publish.spawn().expect("spawn publish");
    {
        use std::io::Write as _;
        let mut stdin = publish.stdin.take().expect("stdin");
        stdin
            .write_all(b"{\"hello\":1}\n")
            .expect("write to publish");
    }
    assert!(publish.wait().expect("publish").success());
    let missing = format!("http://{addr}/no-such-channel");
    let status = relay(&["subscribe", &missing, "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(common::log_file(&d.join("subscribe.err")))
        .status()
        .expect("run subscribe");
    assert!(!status.success(), "subscribing to a missing channel fails");

    // The collector and the demo.
    let keys = d.join("keys");
    std::fs::write(&keys, "k-json\n").unwrap();
    let collector_addr = free_addr();
    let output = format!("jsonl:{}", d.join("out.jsonl").display());
    let collector = spawn_json(
        d,
        "collector",
        &[
            "collector",
            "--listen",
            &collector_addr.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &output,
        ],
        false,
    );
    wait_listening(collector_addr);
    collector.terminate();
    let mut collector = collector;
    assert!(collector.wait(Duration::from_secs(30)).success());
    let status = relay(&["demo", "--duration-secs", "0.4", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(common::log_file(&d.join("demo.err")))
        .status()
        .expect("run demo");
    assert!(status.success());
    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());

    for name in [
        "serve",
        "runner",
        "client",
        "publish",
        "subscribe",
        "collector",
        "demo",
    ] {
        json_lines(name, &d.join(format!("{name}.err")));
    }
    // Their summaries, as JSON lines too, add up (`emitted = delivered + dropped + queued`).
    for name in ["runner", "client", "demo"] {
        let messages: Vec<String> = json_lines(name, &d.join(format!("{name}.err")))
            .iter()
            .filter_map(|l| l["message"].as_str().map(str::to_string))
            .collect();
        common::assert_accounted(&format!("{name} summary (json)"), &messages.join("\n"));
    }
    // Console lines (a command's own words) and log lines alike.
    let client_lines = json_lines("client", &d.join("client.err"));
    assert!(
        has_message(&client_lines, |m| m
            .starts_with("client: telemetry received")),
        "the client's summary is a JSON line"
    );
    let subscribe = json_lines("subscribe", &d.join("subscribe.err"));
    assert!(
        subscribe.iter().any(|l| l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not exist"))),
        "the error a command exits with is a JSON ERROR line: {subscribe:?}"
    );

    // The log sink's line, exactly: one per envelope the runner emitted, in its `message`.
    let telemetry: Vec<&str> = client_lines
        .iter()
        .filter(|l| l["target"] == "telemetry")
        .filter_map(|l| l["message"].as_str())
        .collect();
    let want: Vec<String> = read_lines(&emitted)
        .iter()
        .map(|line| {
            let e: Value = serde_json::from_str(line).expect("emitted envelope");
            let data = &e["data"];
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            format!(
                "TELEMETRY type={} id={} session={} connection={} relayed_via=trickle",
                s(&data["type"]),
                s(&e["id"]),
                s(&data["session_id"]),
                s(&data["connection_id"]),
            )
        })
        .collect();
    assert!(want.len() >= 3, "the session emitted events: {want:?}");
    assert_eq!(telemetry, want);
}

/// `trickle-relay demo` with stderr redirected (a file, not a terminal): plain text, no escapes.
#[test]
fn a_redirected_run_writes_no_escape_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = dir.path().join("demo.err");
    let status = relay(&["demo", "--duration-secs", "0.4"])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(common::log_file(&err))
        .status()
        .expect("run demo");
    assert!(status.success());
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(text.contains("INFO"), "text logs were written: {text}");
    assert!(
        !text.contains('\x1b'),
        "an escape code in a redirected run:\n{text}"
    );
}

/// On a terminal (a pseudo-terminal from `script`, util-linux), the text format is coloured,
/// unless `NO_COLOR` is set.
#[test]
fn a_terminal_gets_colour_unless_no_color_is_set() {
    let on_tty = |no_color: Option<&str>| -> String {
        let cmd = format!("{} demo --duration-secs 0.2", common::BIN);
        let mut script = Command::new("script");
        script
            .args(["-qec", &cmd, "/dev/null"])
            .env("RUST_LOG", "info")
            .env_remove("TRICKLE_RELAY_LOG_FORMAT")
            .stdin(Stdio::null());
        match no_color {
            Some(v) => script.env("NO_COLOR", v),
            None => script.env_remove("NO_COLOR"),
        };
        let out = script.output().unwrap_or_else(|e| {
            panic!("`script` (util-linux, on every Debian) did not start: {e}")
        });
        assert!(out.status.success(), "demo on a pty failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(None);
    assert!(
        coloured.contains("\x1b["),
        "no colour on a terminal:\n{coloured}"
    );
    let plain = on_tty(Some("1"));
    assert!(plain.contains("INFO"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "NO_COLOR=1 still coloured:\n{plain}"
    );
}
