//! `trickle-relay subscribe` / `publish` as real processes against a trickle server started here.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use trickle::server::{Server, ServerConfig};

const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");
const LIMIT: Duration = Duration::from_secs(20);

async fn start_server() -> Server {
    Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            autocreate: true,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// The binary with `args`; its log filter comes from `CLI_TEST_LOG` (default `warn`), e.g.
/// `CLI_TEST_LOG=trickle=debug` to see the clients' decisions in a failure message.
fn cli(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("CLI_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a command to completion with `input` on stdin: (success, stdout, stderr).
async fn run_with_input(mut cmd: Command, input: &[u8]) -> (bool, String, String) {
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    finish(child).await
}

async fn finish(child: Child) -> (bool, String, String) {
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("the command did not finish in time")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Puts one whole segment 0 on the channel (a plain POST, no preconnect left behind).
async fn post_segment_zero(url: &str, body: &'static str) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/0"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_jsonl_from_stdin_and_subscribe_jsonl_prints_every_line() {
    let server = start_server().await;
    server
        .channels()
        .create("cli", Some("application/jsonl"))
        .unwrap();
    let url = format!("{}/cli", server.url());
    // Segment 0 is there first, so the subscriber provably reads (and is connected) before the
    // publisher starts; the publisher then restarts the channel at its live edge (`--reset`).
    post_segment_zero(&url, "{\"warmup\":true}\n").await;

    let mut sub = cli(&["subscribe", "--jsonl", "--from", "0", &url])
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(sub.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(LIMIT, stdout.read_line(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, "{\"warmup\":true}\n");

    let input = concat!(
        "{\"type\":\"ping\",\"timestamp\":1}\n",
        "not json at all\n",
        "  { \"spaced\" : [ 1, 2 ],\"s\":\"a b\" }  \r\n",
        "[1,2]\n",
        "\n",
        "{\"type\":\"telemetry\",\"event\":{\"id\":\"e1\",\"n\":1.50}}\n",
        "{\"last\":\"no newline\"}",
    );
    let (ok, _, err) = run_with_input(
        cli(&["publish", "--jsonl", "--reset", &url]),
        input.as_bytes(),
    )
    .await;
    assert!(ok, "publish failed: {err}");
    assert!(err.contains("4 lines in 1 segments"), "{err}");
    assert!(err.contains("2 bad lines skipped"), "{err}");
    assert!(
        err.contains("message 2 skipped: line is not a JSON object"),
        "{err}"
    );

    // The publisher closed the channel, so the subscriber ends by itself.
    let mut rest = String::new();
    if tokio::time::timeout(LIMIT, stdout.read_to_string(&mut rest))
        .await
        .is_err()
    {
        let _ = sub.start_kill();
        let (_, _, err) = finish(sub).await;
        panic!(
            "subscribe did not end; printed {rest:?}; channels {:?}; stderr:\n{err}",
            server.channels().list()
        );
    }
    let (ok, _, err) = finish(sub).await;
    assert!(ok, "subscribe failed: {err}");
    assert_eq!(
        rest,
        concat!(
            "{\"type\":\"ping\",\"timestamp\":1}\n",
            "{\"spaced\":[1,2],\"s\":\"a b\"}\n",
            "{\"type\":\"telemetry\",\"event\":{\"id\":\"e1\",\"n\":1.50}}\n",
            "{\"last\":\"no newline\"}\n",
        )
    );
    assert!(err.contains("5 lines from 2 segments"), "{err}");
    assert!(err.contains("the channel ended"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_raw_stdin_and_subscribe_raw_prints_the_bytes() {
    let server = start_server().await;
    server.channels().create("raw", None).unwrap();
    let url = format!("{}/raw", server.url());
    post_segment_zero(&url, "warm|").await;

    let mut sub = cli(&["subscribe", "--from", "0", &url]).spawn().unwrap();
    let mut stdout = sub.stdout.take().unwrap();
    let mut warm = [0u8; 5];
    tokio::time::timeout(LIMIT, stdout.read_exact(&mut warm))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&warm, b"warm|");

    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (ok, _, err) = run_with_input(cli(&["publish", "--reset", &url]), &payload).await;
    assert!(ok, "publish failed: {err}");
    assert!(err.contains("200000 bytes"), "{err}");

    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, stdout.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let (ok, _, err) = finish(sub).await;
    assert!(ok, "subscribe failed: {err}");
    assert!(
        rest == payload,
        "the bytes differ ({} vs {} bytes)",
        rest.len(),
        payload.len()
    );
    assert!(err.contains("2 segments, 200005 bytes"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_exits_non_zero_with_a_clear_message() {
    let url = format!("http://127.0.0.1:{}/nobody", closed_port());
    let (ok, out, err) = finish(cli(&["subscribe", "--jsonl", &url]).spawn().unwrap()).await;
    assert!(!ok, "subscribe should fail");
    assert!(out.is_empty());
    assert!(
        err.contains("cannot reach") && err.contains("connection refused"),
        "{err}"
    );
    assert!(err.contains("is the trickle server running?"), "{err}");

    let (ok, _, err) = run_with_input(
        cli(&["publish", "--jsonl", &url]),
        b"{\"a\":1}\n{\"b\":2}\n",
    )
    .await;
    assert!(!ok, "publish should fail");
    assert!(err.contains("2 lines NOT delivered"), "{err}");
    assert!(err.contains("is the trickle server running?"), "{err}");

    let (ok, _, err) = run_with_input(cli(&["publish", &url]), b"raw bytes").await;
    assert!(!ok, "raw publish should fail");
    assert!(err.contains("is the trickle server running?"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_a_missing_channel_names_the_fix() {
    let server = start_server().await;
    let url = format!("{}/missing", server.url());
    let (ok, _, err) = finish(cli(&["subscribe", &url]).spawn().unwrap()).await;
    assert!(!ok);
    assert!(
        err.contains("does not exist") && err.contains("check the channel name"),
        "{err}"
    );
    server.shutdown().await;
}
