//! Request framing (RFC 9112 sections 6.1, 6.3 and 7.1), tried as an attacker would: each input is
//! a fuzz seed (`fuzz/corpus/server_request/framing-*`, replayed by the fuzz target too) sent raw
//! over loopback TCP to a real server. A message whose length is ambiguous is answered 400 and
//! the connection closed, so the request smuggled behind it (`DELETE /victim`) is never served.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trickle::server::Server;

mod common;

const WAIT: Duration = Duration::from_secs(10);

/// A fuzz seed of the server_request target, by name.
fn seed(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../fuzz/corpus/server_request/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fuzz seed {path}: {e}"))
}

/// A server (autocreate) with channels `ch` and `victim`.
async fn start() -> Server {
    let server = common::autocreate_server().await;
    server.channels().create("ch", None).unwrap();
    server.channels().create("victim", None).unwrap();
    server
}

/// What the server answered on one connection carrying `bytes` (the client then half-closes),
/// and whether it closed the connection (EOF within [`WAIT`]) rather than waiting for more.
async fn exchange(server: &Server, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// The status of every response in `answer`, in order.
fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| answer.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// `seed` gets exactly one answer, `status`, with `Connection: close`, the connection is closed,
/// and the request behind it was not served (`victim` still exists).
async fn refused(name: &str, status: u16) {
    let server = start().await;
    let (answer, closed) = exchange(&server, &seed(name)).await;
    assert_eq!(statuses(&answer), vec![status], "{name}: {answer}");
    assert!(answer.contains("Connection: close\r\n"), "{name}: {answer}");
    assert!(
        closed,
        "{name}: the connection must be closed after the answer"
    );
    assert!(
        server.channels().list().contains(&"victim".to_string()),
        "{name}: the request smuggled behind it was served"
    );
    // The server keeps serving everyone else.
    let (ok, _) = exchange(
        &server,
        b"GET /ch/next HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&ok), vec![200], "{ok}");
    server.shutdown().await;
}

#[tokio::test]
async fn content_length_and_transfer_encoding_together_are_400_and_close() {
    // Section 6.3 rule 3: Content-Length first (CL.TE) and Transfer-Encoding first (TE.CL).
    refused("framing-cl-te-smuggle", 400).await;
    refused("framing-te-cl-smuggle", 400).await;
}

#[tokio::test]
async fn transfer_encoding_not_ending_in_chunked_is_400_and_close() {
    // Section 6.3 rule 4: the body length cannot be determined.
    refused("framing-te-chunked-not-final", 400).await;
    refused("framing-te-gzip-only", 400).await;
    refused("framing-te-empty", 400).await;
}

#[tokio::test]
async fn chunked_applied_twice_is_400_and_close() {
    // Section 6.1: a sender MUST NOT apply chunked more than once.
    refused("framing-te-chunked-twice", 400).await;
}

#[tokio::test]
async fn transfer_encoding_in_http_1_0_is_400_and_close() {
    // Section 6.1: treat the framing as faulty.
    refused("framing-te-http10", 400).await;
}

#[tokio::test]
async fn invalid_content_length_is_400_and_close() {
    // Section 6.3 rule 5: a sign, a list, two different values.
    refused("framing-cl-plus-sign", 400).await;
    refused("framing-cl-list", 400).await;
    refused("framing-cl-conflict", 400).await;
}

#[tokio::test]
async fn chunk_size_that_is_not_hex_digits_is_400_and_close() {
    // Section 7.1: chunk-size = 1*HEXDIG.
    refused("framing-chunk-size-sign", 400).await;
}

#[tokio::test]
async fn unknown_coding_before_chunked_is_501_and_close() {
    // Section 6.1: a transfer coding the server does not implement.
    refused("framing-gzip-chunked", 501).await;
}

#[tokio::test]
async fn body_shorter_than_its_content_length_gets_no_answer() {
    // Section 6.3 rule 6: the client closed before Content-Length bytes came: incomplete.
    let server = start().await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(&seed("framing-cl-incomplete")).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("closed")
        .unwrap();
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    server.shutdown().await;
}

#[tokio::test]
async fn request_without_length_has_no_body_and_the_next_request_is_served() {
    // Section 6.3 rule 7: neither header: no body; what follows the head is the next request.
    let server = start().await;
    let (answer, closed) = exchange(&server, &seed("framing-no-length-pipelined")).await;
    assert_eq!(statuses(&answer), vec![200, 200], "{answer}");
    assert!(closed);
    server.shutdown().await;
}

#[tokio::test]
async fn repeated_identical_content_length_is_accepted() {
    // RFC 9110 section 8.6: identical values may be accepted as one.
    let server = start().await;
    let (answer, _) = exchange(&server, &seed("framing-cl-repeated-same")).await;
    assert_eq!(statuses(&answer), vec![200, 200], "{answer}");
    server.shutdown().await;
}
