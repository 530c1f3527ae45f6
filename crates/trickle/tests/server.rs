//! Behaviour of the trickle server beyond the recorded reference responses: hardening, limits,
//! keepalives, wake-ups, housekeeping and shutdown. Real servers on loopback TCP.

use bytes::Bytes;
use futures::channel::mpsc;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trickle::server::{random_channel_name, Server, ServerConfig, ServerError};

mod common;
use common::parked;

const WAIT: Duration = Duration::from_secs(10);

async fn start(config: ServerConfig) -> Server {
    Server::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

fn auto() -> ServerConfig {
    ServerConfig {
        autocreate: true,
        ..Default::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// A streamed request body and the sender that feeds it (drop the sender to end it).
type Feed = mpsc::UnboundedSender<Result<Bytes, std::io::Error>>;

fn streamed() -> (Feed, reqwest::Body) {
    let (tx, rx) = mpsc::unbounded();
    (tx, reqwest::Body::wrap_stream(rx))
}

fn send(feed: &Feed, text: &'static str) {
    feed.unbounded_send(Ok(Bytes::from_static(text.as_bytes())))
        .unwrap();
}

/// Sends raw bytes on a new connection and reads until the server closes (or `WAIT` passes).
async fn raw(server: &Server, request: &[u8]) -> String {
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn bad_sequence_numbers_are_400_invalid_idx() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    c.post(format!("{url}/ch")).send().await.unwrap();
    for (method, path) in [
        ("GET", "/ch/-3"),
        ("GET", "/ch/-100"),
        ("GET", "/ch/1.5"),
        ("GET", "/ch/abc"),
        ("GET", "/ch/99999999999999999999999"),
        ("POST", "/ch/-2"),
        ("POST", "/ch/x1"),
        ("DELETE", "/ch/-1"),
    ] {
        let resp = c
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{method} {path}");
        assert_eq!(
            resp.text().await.unwrap(),
            "Invalid idx\n",
            "{method} {path}"
        );
    }
    // The server is still fine.
    let next = c.get(format!("{url}/ch/next")).send().await.unwrap();
    assert_eq!(next.text().await.unwrap(), "0");
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_segment_gets_413_and_keeps_what_fit() {
    let server = start(ServerConfig {
        max_segment_bytes: 1000,
        ..auto()
    })
    .await;
    let url = server.url();
    let c = client();
    let resp = c
        .post(format!("{url}/big/0"))
        .body(vec![b'a'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let msg = resp.text().await.unwrap();
    assert!(msg.contains("max_segment_bytes (1000 bytes)"), "{msg}");
    // The segment is closed with at most the cap stored; the next segment works.
    let got = c.get(format!("{url}/big/0")).send().await.unwrap();
    assert!(got.bytes().await.unwrap().len() <= 1000);
    let ok = c
        .post(format!("{url}/big/1"))
        .body("fits")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn channel_cap_is_a_clear_error() {
    let server = start(ServerConfig {
        max_channels: 2,
        ..auto()
    })
    .await;
    let url = server.url();
    let c = client();
    for name in ["a", "b"] {
        let r = c.post(format!("{url}/{name}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = c.post(format!("{url}/c")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("too many channels (limit 2)"));
    let r = c.post(format!("{url}/c/0")).body("x").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(
        server.channels().create("c", None),
        Err(ServerError::TooManyChannels { limit: 2 })
    );
    // Existing channels still take writes, and freeing one makes room.
    assert!(server.channels().close("a"));
    assert_eq!(server.channels().create("c", None), Ok(()));
    server.shutdown().await;
}

#[tokio::test]
async fn connection_cap_answers_503() {
    let server = start(ServerConfig {
        max_connections: 2,
        ..auto()
    })
    .await;
    let _a = TcpStream::connect(server.local_addr()).await.unwrap();
    let _b = TcpStream::connect(server.local_addr()).await.unwrap();
    let reply = raw(&server, b"GET /x/next HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("too many connections (limit 2)"), "{reply}");
    drop((_a, _b));
    let url = server.url();
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = client().post(format!("{url}/x")).send().await {
            if r.status().as_u16() == 200 {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "freed connection slots are reused");
    server.shutdown().await;
}

#[tokio::test]
async fn idle_preconnected_post_gets_repeated_100_continue() {
    let server = start(ServerConfig {
        keepalive_interval: Duration::from_millis(200),
        ..auto()
    })
    .await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(b"POST /ka/0 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while String::from_utf8_lossy(&seen)
        .matches("HTTP/1.1 100 Continue\r\n\r\n")
        .count()
        < 3
    {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("three 100 Continue keepalives")
            .unwrap();
        assert!(n > 0, "server closed the preconnected POST");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&seen).contains("HTTP/1.1 200"));
    // The first byte ends the keepalives; the segment then completes normally.
    s.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        rest.extend_from_slice(&buf[..n]);
        if n == 0 || String::from_utf8_lossy(&rest).contains("\r\n\r\n") {
            break;
        }
    }
    let rest = String::from_utf8_lossy(&rest);
    let final_start = rest.find("HTTP/1.1 200").expect("a final 200");
    assert!(
        rest[final_start..].contains("Lp-Trickle-Seq: 0\r\n"),
        "{rest}"
    );
    let got = client()
        .get(format!("{}/ka/0", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(got.text().await.unwrap(), "hello");
    server.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let server = start(auto()).await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    s.write_all(
        b"POST /ex/0 HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    s.write_all(b"abc").await.unwrap();
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    server.shutdown().await;
}

#[tokio::test]
async fn readers_stream_data_while_the_segment_is_written() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    let (feed, body) = streamed();
    let post = tokio::spawn(c.post(format!("{url}/live/0")).body(body).send());
    send(&feed, "first\n");
    let mut reader = c.get(format!("{url}/live/0")).send().await.unwrap();
    assert_eq!(reader.status().as_u16(), 200);
    let chunk = tokio::time::timeout(WAIT, reader.chunk())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        chunk.as_deref(),
        Some(&b"first\n"[..]),
        "data arrives before the POST ends"
    );
    send(&feed, "second\n");
    let chunk = tokio::time::timeout(WAIT, reader.chunk())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chunk.as_deref(), Some(&b"second\n"[..]));
    drop(feed);
    assert_eq!(
        tokio::time::timeout(WAIT, reader.chunk())
            .await
            .unwrap()
            .unwrap(),
        None
    );
    assert_eq!(post.await.unwrap().unwrap().status().as_u16(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let server = start(auto()).await;
    let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(b"POST /k/0 HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi");
    req.extend_from_slice(b"GET /k/0 HTTP/1.1\r\nHost: t\r\n\r\n");
    req.extend_from_slice(b"GET /k/next HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    assert!(
        out.contains("Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\n1"), "{out}");
    drop(s);
    server.shutdown().await;
}

#[tokio::test]
async fn delete_channel_wakes_pending_get_streaming_reader_and_preconnected_post() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    // Segment 0 is being written (partial data); segment 1 has a pending reader and a
    // preconnected publisher.
    let (feed, body) = streamed();
    let writer = tokio::spawn(c.post(format!("{url}/d/0")).body(body).send());
    send(&feed, "partial");
    let mut streaming = c.get(format!("{url}/d/0")).send().await.unwrap();
    let chunk = tokio::time::timeout(WAIT, streaming.chunk())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(chunk.as_deref(), Some(&b"partial"[..]));
    let pending = tokio::spawn(c.get(format!("{url}/d/1")).send());
    let (_feed1, body1) = streamed();
    let preconnected = tokio::spawn(c.post(format!("{url}/d/2")).body(body1).send());
    parked(&server.channels(), "d", 1, 1, 0).await;
    parked(&server.channels(), "d", 2, 0, 1).await;

    let del = c.delete(format!("{url}/d")).send().await.unwrap();
    assert_eq!(del.status().as_u16(), 200);

    let pending = tokio::time::timeout(WAIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pending.status().as_u16(), 200);
    assert_eq!(pending.headers()["lp-trickle-closed"], "terminated");
    assert_eq!(pending.headers()["lp-trickle-seq"], "1");
    assert_eq!(pending.text().await.unwrap(), "");
    assert_eq!(
        tokio::time::timeout(WAIT, streaming.chunk())
            .await
            .unwrap()
            .unwrap(),
        None
    );
    let pre = tokio::time::timeout(WAIT, preconnected)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pre.status().as_u16(), 200);
    assert_eq!(pre.headers()["lp-trickle-closed"], "terminated");
    let w = tokio::time::timeout(WAIT, writer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(w.headers()["lp-trickle-closed"], "terminated");
    let gone = c.get(format!("{url}/d/0")).send().await.unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn a_deleted_channel_is_not_recreated_by_a_late_segment_post() {
    let server = start(auto()).await;
    let url = server.url();
    let post = |c: &reqwest::Client, path: &str, body: &'static str| {
        c.post(format!("{url}/{path}")).body(body).send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    // The publisher's keep-alive connection, idle (ready for its next request) from here on.
    let publisher = client();
    assert_eq!(status(post(&publisher, "gone", "").await.unwrap()), 200);
    let other = client();
    assert_eq!(status(post(&other, "gone/0", "a").await.unwrap()), 200);
    assert_eq!(
        status(other.delete(format!("{url}/gone")).send().await.unwrap()),
        200
    );
    // The publisher's preconnected POST of its next segment, on a connection that was ready
    // before the DELETE, read by the server after it: recreating the channel would strand every
    // subscriber on an empty channel.
    let late = post(&publisher, "gone/1", "b").await.unwrap();
    assert_eq!(late.status().as_u16(), 404);
    assert_eq!(late.text().await.unwrap(), "Stream not found\n");
    assert!(!server.channels().list().contains(&"gone".to_string()));
    // A connection opened after the DELETE may create it again; its segments are then written
    // as usual.
    let fresh = client();
    assert_eq!(status(post(&fresh, "gone", "").await.unwrap()), 200);
    assert_eq!(status(post(&fresh, "gone/0", "c").await.unwrap()), 200);
    // So may a request sent on the same connection after the DELETE was answered.
    assert_eq!(
        status(other.delete(format!("{url}/gone")).send().await.unwrap()),
        200
    );
    assert_eq!(status(post(&other, "gone/1", "d").await.unwrap()), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn reset_wakes_readers_of_older_segments() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    let (feed, body) = streamed();
    let dead = tokio::spawn(c.post(format!("{url}/r/3")).body(body).send());
    send(&feed, "half");
    let mut reader = c.get(format!("{url}/r/3")).send().await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, reader.chunk())
            .await
            .unwrap()
            .unwrap()
            .as_deref(),
        Some(&b"half"[..])
    );
    let fresh = c
        .post(format!("{url}/r/4"))
        .header("Lp-Trickle-Reset", "1")
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.headers()["lp-trickle-seq"], "4");
    assert_eq!(
        tokio::time::timeout(WAIT, reader.chunk())
            .await
            .unwrap()
            .unwrap(),
        None
    );
    drop(feed);
    let dead = tokio::time::timeout(WAIT, dead)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(dead.status().as_u16(), 200);
    // What the reader saw stays; the dead publisher's late bytes were not added.
    let again = c.get(format!("{url}/r/3")).send().await.unwrap();
    assert_eq!(again.text().await.unwrap(), "half");
    server.shutdown().await;
}

#[tokio::test]
async fn evicted_segment_reader_is_cut_not_buffered() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    let (feed, body) = streamed();
    let _slow = tokio::spawn(c.post(format!("{url}/e/0")).body(body).send());
    send(&feed, "old");
    let mut reader = c.get(format!("{url}/e/0")).send().await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, reader.chunk())
            .await
            .unwrap()
            .unwrap()
            .as_deref(),
        Some(&b"old"[..])
    );
    for seq in 1..=5 {
        let r = c
            .post(format!("{url}/e/{seq}"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    // Segment 0 fell out of the ring: its reader gets an incomplete response, not a clean end.
    let end = tokio::time::timeout(WAIT, reader.chunk()).await.unwrap();
    assert!(end.is_err(), "expected a cut response, got {end:?}");
    let r = c.get(format!("{url}/e/0")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 470);
    assert_eq!(r.headers()["lp-trickle-latest"], "6");
    drop(feed);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_channels_are_swept_but_underscore_channels_are_not() {
    let server = start(ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..auto()
    })
    .await;
    let channels = server.channels();
    channels.create("idle", None).unwrap();
    channels.create("_internal", None).unwrap();
    common::until("idle channel swept", WAIT, || {
        !channels.list().contains(&"idle".to_string())
    })
    .await;
    assert!(channels.list().contains(&"_internal".to_string()));
    let r = client()
        .get(format!("{}/idle/0", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn changes_feed_announces_added_and_removed() {
    let server = start(ServerConfig {
        changes_feed: true,
        ..auto()
    })
    .await;
    let url = server.url();
    let c = client();
    assert!(server.channels().list().contains(&"_changes".to_string()));
    // A subscriber preconnected to the feed sees the first announcement.
    let first = tokio::spawn(c.get(format!("{url}/_changes/-1")).send());
    parked(&server.channels(), "_changes", 0, 1, 0).await;
    c.post(format!("{url}/news")).send().await.unwrap();
    let first = tokio::time::timeout(WAIT, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.headers()["content-type"], "application/json");
    assert_eq!(first.text().await.unwrap(), r#"{"added":["news"]}"#);
    c.delete(format!("{url}/news")).send().await.unwrap();
    let second = c.get(format!("{url}/_changes/1")).send().await.unwrap();
    assert_eq!(second.text().await.unwrap(), r#"{"removed":["news"]}"#);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_makes_every_waiter_return() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    c.post(format!("{url}/s")).send().await.unwrap();
    let pending = tokio::spawn(c.get(format!("{url}/s/0")).send());
    let (_feed, body) = streamed();
    let preconnected = tokio::spawn(c.post(format!("{url}/s/1")).body(body).send());
    parked(&server.channels(), "s", 0, 1, 0).await;
    parked(&server.channels(), "s", 1, 0, 1).await;
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown is prompt");
    let pending = tokio::time::timeout(WAIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pending.headers()["lp-trickle-closed"], "terminated");
    let pre = tokio::time::timeout(WAIT, preconnected)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pre.headers()["lp-trickle-closed"], "terminated");
    assert!(TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .is_err());
}

#[tokio::test]
async fn garbage_and_huge_heads_get_errors_and_the_server_keeps_serving() {
    let server = start(auto()).await;
    let reply = raw(&server, b"\x00\x01\x02 garbage \xff\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let huge = format!(
        "GET /a/0 HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20 * 1024)
    );
    let reply = raw(&server, huge.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let reply = raw(
        &server,
        format!("GET /a/0 HTTP/1.1\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let reply = raw(
        &server,
        b"POST /a/0 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    )
    .await;
    // Not ending in chunked: the length cannot be known (RFC 9112 6.3; tests/framing.rs).
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let reply = raw(
        &server,
        b"POST /a/0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let reply = raw(
        &server,
        b"POST /a/0 HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // A client that vanishes mid-head or mid-body does no harm.
    {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(b"GET /a/0 HTTP/1.1\r\nHo").await.unwrap();
    }
    {
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        s.write_all(b"POST /a/9 HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
    }
    // Random blobs (some starting like real requests) on their own connections.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..40 {
        let mut blob: Vec<u8> = if i % 2 == 0 {
            b"POST /a/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else {
            Vec::new()
        };
        let len = rng.gen_range(1..2000);
        blob.extend((0..len).map(|_| rng.gen::<u8>()));
        let mut s = TcpStream::connect(server.local_addr()).await.unwrap();
        let _ = s.write_all(&blob).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    }
    let reply = raw(&server, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    let reply = raw(&server, b"GET /a/b/c HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    let r = client()
        .post(format!("{}/a/0", server.url()))
        .body("still here")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn base_path_prefixes_every_route() {
    let server = start(ServerConfig {
        base_path: "/ai/trickle".into(),
        ..auto()
    })
    .await;
    let url = server.url();
    assert!(url.ends_with("/ai/trickle"), "{url}");
    let c = client();
    let r = c
        .post(format!("{url}/bp/0"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let root = format!("http://{}/bp/0", server.local_addr());
    assert_eq!(c.get(root).send().await.unwrap().status().as_u16(), 404);
    server.shutdown().await;
}

#[tokio::test]
async fn without_autocreate_unknown_channels_are_404_with_connection_close() {
    let server = start(ServerConfig::default()).await;
    let reply = raw(
        &server,
        b"POST /nope/0 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(reply.contains("Connection: close\r\n"), "{reply}");
    assert!(reply.ends_with("Stream not found\n"), "{reply}");
    let r = client()
        .post(format!("{}/nope", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // The orchestrator creates channels in process instead.
    server
        .channels()
        .create("made", Some("application/jsonl"))
        .unwrap();
    let r = client()
        .post(format!("{}/made/0", server.url()))
        .body("{}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let g = client()
        .get(format!("{}/made/0", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(g.headers()["content-type"], "application/jsonl");
    server.shutdown().await;
}

#[tokio::test]
async fn in_process_channels_api() {
    let server = start(ServerConfig::default()).await;
    let ch = server.channels();
    let name = random_channel_name();
    assert_eq!(name.len(), 32);
    ch.create(&name, Some("application/jsonl")).unwrap();
    ch.create(&name, None).unwrap();
    ch.create("second", None).unwrap();
    let mut expected = vec![name.clone(), "second".to_string()];
    expected.sort();
    assert_eq!(ch.list(), expected);
    assert!(matches!(
        ch.create("a/b", None),
        Err(ServerError::InvalidName(_))
    ));
    assert!(matches!(
        ch.create("", None),
        Err(ServerError::InvalidName(_))
    ));
    // close() wakes a reader waiting on the channel.
    let url = server.url();
    let pending = tokio::spawn(reqwest::get(format!("{url}/{name}/0")));
    parked(&server.channels(), &name, 0, 1, 0).await;
    assert!(ch.close(&name));
    assert!(!ch.close(&name));
    let pending = tokio::time::timeout(WAIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pending.headers()["lp-trickle-closed"], "terminated");
    assert_eq!(ch.list(), vec!["second".to_string()]);
    server.shutdown().await;
}

#[tokio::test]
async fn rewriting_a_segment_keeps_the_first_data_and_retry_of_an_idle_post_wins() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    // A preconnected POST that never sent a byte is superseded by a retry of the same seq.
    let (_stale_feed, stale_body) = streamed();
    let _stale = tokio::spawn(c.post(format!("{url}/w/0")).body(stale_body).send());
    parked(&server.channels(), "w", 0, 0, 1).await;
    let retry = c
        .post(format!("{url}/w/0"))
        .body("retry")
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status().as_u16(), 200);
    let again = c
        .post(format!("{url}/w/0"))
        .body("rewrite")
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["lp-trickle-seq"], "0");
    let got = c.get(format!("{url}/w/0")).send().await.unwrap();
    assert_eq!(got.text().await.unwrap(), "retry");
    server.shutdown().await;
}

#[tokio::test]
async fn channels_segments_shows_parked_readers_and_preconnected_writers() {
    let server = start(auto()).await;
    let url = server.url();
    let c = client();
    let channels = server.channels();
    assert_eq!(channels.segments("v"), None, "no such channel");
    c.post(format!("{url}/v")).send().await.unwrap();
    assert_eq!(channels.segments("v"), Some(vec![]));
    // A reader waiting for segment 0, a publisher preconnected to segment 0 without a byte.
    let reader = tokio::spawn(c.get(format!("{url}/v/0")).send());
    let (feed, body) = streamed();
    let writer = tokio::spawn(c.post(format!("{url}/v/0")).body(body).send());
    parked(&channels, "v", 0, 1, 1).await;
    let seg = common::segment(&channels, "v", 0).unwrap();
    assert_eq!((seg.bytes, seg.closed), (0, false), "{seg:?}");
    send(&feed, "hello");
    common::until("5 bytes stored", WAIT, || {
        common::segment(&channels, "v", 0).is_some_and(|s| s.bytes == 5)
    })
    .await;
    drop(feed);
    let posted = tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    assert_eq!(posted.unwrap().status().as_u16(), 200);
    let read = tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(read.unwrap().text().await.unwrap(), "hello");
    // Both requests are done: nobody holds the segment any more.
    common::until("the requests let go of the segment", WAIT, || {
        common::segment(&channels, "v", 0)
            == Some(trickle::server::SegmentInfo {
                seq: 0,
                readers: 0,
                writers: 0,
                bytes: 5,
                closed: true,
            })
    })
    .await;
    server.shutdown().await;
}
