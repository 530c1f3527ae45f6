//! Publisher and subscriber against the real trickle server on loopback TCP.

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use trickle::publisher::{PublishError, Publisher, PublisherOptions, PublisherState};
use trickle::server::{Server, ServerConfig};
use trickle::subscriber::{SegmentReader, SubscribeError, Subscriber, SubscriberOptions};

mod common;
use common::parked;

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

fn fast_publisher() -> PublisherOptions {
    PublisherOptions {
        retry_delay: Duration::from_millis(100),
        ..Default::default()
    }
}

fn sub_from(start_seq: i64) -> SubscriberOptions {
    SubscriberOptions {
        start_seq,
        ..Default::default()
    }
}

/// Deterministic, seq-specific content (binary included), several writes per segment.
fn segment_parts(seq: i64) -> Vec<Bytes> {
    (0..(1 + seq % 4))
        .map(|part| {
            let mut v = format!("segment {seq} part {part}|").into_bytes();
            v.extend((0..(seq * 37 + part) % 300).map(|i| (i * 7 + seq) as u8));
            Bytes::from(v)
        })
        .collect()
}

fn segment_bytes(seq: i64) -> Vec<u8> {
    segment_parts(seq).concat()
}

async fn publish_segment(p: &mut Publisher, expect_seq: i64) {
    let mut seg = p.next_segment().await.unwrap();
    assert_eq!(seg.seq(), expect_seq);
    for part in segment_parts(expect_seq) {
        seg.write(part).await.unwrap();
    }
    seg.close().await.unwrap();
}

async fn read_all(seg: &mut SegmentReader) -> Result<Vec<u8>, SubscribeError> {
    let mut out = Vec::new();
    while let Some(chunk) = seg.chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// One segment as read: its seq and its bytes.
type Received = (i64, Vec<u8>);

/// Reads segments until the channel ends, reporting how many arrived (for flow control: the
/// server keeps only 5 segments, so the publishers below stay at most 3 ahead).
fn spawn_reader(
    mut sub: Subscriber,
    progress: watch::Sender<usize>,
) -> tokio::task::JoinHandle<(Vec<Received>, Subscriber)> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match sub.next_segment().await {
                Ok(Some(mut seg)) => {
                    let data = read_all(&mut seg).await.unwrap();
                    got.push((seg.seq(), data));
                    progress.send_replace(got.len());
                }
                Ok(None) => break,
                Err(e) => panic!("subscriber failed: {e}"),
            }
        }
        (got, sub)
    })
}

async fn wait_progress(rx: &mut watch::Receiver<usize>, at_least: usize) {
    within("reader progress", rx.wait_for(|n| *n >= at_least))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_segments_round_trip_byte_exact_and_in_order() {
    let server = common::autocreate_server().await;
    let url = format!("{}/roundtrip", server.url());
    server.channels().create("roundtrip", None).unwrap();
    let (tx, mut rx) = watch::channel(0);
    let reader = spawn_reader(Subscriber::new(&url, sub_from(0)), tx);

    let mut p = Publisher::new(&url, fast_publisher());
    for seq in 0..50 {
        if seq >= 3 {
            wait_progress(&mut rx, seq as usize - 3).await;
        }
        within("publish", publish_segment(&mut p, seq)).await;
    }
    wait_progress(&mut rx, 50).await;
    let stats = p.stats();
    assert_eq!(
        (stats.segments_ok, stats.segments_failed, stats.retries),
        (50, 0, 0)
    );
    within("close", p.close()).await.unwrap();

    let (got, sub) = within("reader end", reader).await.unwrap();
    assert_eq!(got.len(), 50);
    for (i, (seq, data)) in got.iter().enumerate() {
        assert_eq!(*seq, i as i64);
        assert_eq!(data, &segment_bytes(*seq), "segment {seq} differs");
    }
    let s = sub.stats();
    assert_eq!(s.segments, 50);
    assert_eq!(s.jumps, 0);
    assert_eq!(
        s.bytes,
        got.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_subscriber_starts_at_the_segment_being_written() {
    let server = common::autocreate_server().await;
    let url = format!("{}/live", server.url());
    let mut p = Publisher::new(&url, fast_publisher());
    for seq in 0..3 {
        publish_segment(&mut p, seq).await;
    }
    // Segment 3 is open and half written when the subscriber arrives.
    let mut open = p.next_segment().await.unwrap();
    open.write(Bytes::from_static(b"first half,"))
        .await
        .unwrap();
    wait_next_seq(&url, 4).await;
    let mut sub = Subscriber::new(&url, SubscriberOptions::default());
    let mut seg = within("subscribe", sub.next_segment())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seg.seq(), 3);
    open.write(Bytes::from_static(b"second half"))
        .await
        .unwrap();
    open.close().await.unwrap();
    assert_eq!(
        within("read", read_all(&mut seg)).await.unwrap(),
        b"first half,second half"
    );
    p.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_falling_behind_jumps_to_the_live_edge() {
    let server = common::autocreate_server().await;
    let url = format!("{}/behind", server.url());
    let mut p = Publisher::new(&url, fast_publisher());
    publish_segment(&mut p, 0).await;
    let mut sub = Subscriber::new(&url, sub_from(0));
    let mut first = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(
        within("read 0", read_all(&mut first)).await.unwrap(),
        segment_bytes(0)
    );
    // The subscriber stalls while the publisher writes 14 more segments (the server keeps 5).
    for seq in 1..15 {
        publish_segment(&mut p, seq).await;
    }
    // Seq 1 was preconnected before it was evicted; whatever comes after must be the live edge.
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        loop {
            let mut seg = sub.next_segment().await.unwrap().unwrap();
            let data = read_all(&mut seg).await.unwrap();
            if seg.seq() >= 15 {
                assert_eq!(
                    data,
                    segment_bytes(seg.seq()),
                    "segment {} differs",
                    seg.seq()
                );
            }
            seqs.push(seg.seq());
            if seg.seq() >= 15 {
                return (seqs, sub.stats());
            }
        }
    });
    // Once the reader has hit the 470 and waits at the live edge, write it.
    parked(&server.channels(), "behind", 15, 1, 0).await;
    publish_segment(&mut p, 15).await;
    let (seqs, stats) = within("jump", reader).await.unwrap();
    assert_eq!(seqs.last(), Some(&15));
    assert!(
        seqs.len() <= 2,
        "read old segments instead of jumping: {seqs:?}"
    );
    assert!(stats.jumps >= 1, "{stats:?}");
    assert!(stats.skipped_segments >= 10, "{stats:?}");
    p.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jump_to_current_lands_on_the_open_segment_and_reads_it_from_its_start() {
    let server = common::autocreate_server().await;
    let url = format!("{}/current", server.url());
    let mut p = Publisher::new(&url, fast_publisher());
    for seq in 0..10 {
        publish_segment(&mut p, seq).await;
    }
    // Segment 10 is being written: its first part is there, the rest comes later.
    let mut open = p.next_segment().await.unwrap();
    assert_eq!(open.seq(), 10);
    let parts = segment_parts(10);
    open.write(parts[0].clone()).await.unwrap();
    // The server has its first byte: `next` (Lp-Trickle-Latest) is 11.
    wait_next_seq(&url, 11).await;
    // A reader far behind (seq 1 left the 5-segment window long ago).
    let mut sub = Subscriber::new(
        &url,
        SubscriberOptions {
            jump_to_current: true,
            ..sub_from(1)
        },
    );
    let reader = tokio::spawn(async move {
        let mut seg = sub.next_segment().await.unwrap().unwrap();
        let seq = seg.seq();
        (seq, read_all(&mut seg).await.unwrap(), sub.stats())
    });
    for part in &parts[1..] {
        open.write(part.clone()).await.unwrap();
    }
    open.close().await.unwrap();
    let (seq, data, stats) = within("jump to the open segment", reader).await.unwrap();
    assert_eq!(seq, 10, "the segment being written, not the next one");
    assert_eq!(data, segment_bytes(10), "read whole, from its first byte");
    assert_eq!(stats.skipped_segments, 9, "{stats:?}");
    p.close().await.unwrap();
    server.shutdown().await;
}

/// Publisher 1 writes segment 0, half of segment 1, then hangs with its connections open (its
/// writer is leaked, never closed nor dropped): readers of segment 1 would wait forever.
/// Publisher 2 restarts with `reset`: it starts at the channel's `/next` and its reset header
/// closes segment 1, so the readers move on to its segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_publisher_is_replaced_by_a_reset_publisher() {
    let server = common::autocreate_server().await;
    let url = format!("{}/hung", server.url());
    let mut p1 = Publisher::new(&url, fast_publisher());
    publish_segment(&mut p1, 0).await;
    let mut half = p1.next_segment().await.unwrap();
    half.write(Bytes::from_static(b"half of one"))
        .await
        .unwrap();
    std::mem::forget(half);
    std::mem::forget(p1);
    wait_next_seq(&url, 2).await;

    let (tx, mut rx) = watch::channel(0);
    let reader = spawn_reader(Subscriber::new(&url, sub_from(0)), tx);
    wait_progress(&mut rx, 1).await;

    let mut p2 = Publisher::new(
        &url,
        PublisherOptions {
            reset: true,
            ..fast_publisher()
        },
    );
    for seq in 2..5 {
        within("reset publisher", publish_segment(&mut p2, seq)).await;
    }
    wait_progress(&mut rx, 5).await;
    p2.close().await.unwrap();
    let (got, _) = within("reader end", reader).await.unwrap();
    let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    assert_eq!(
        got[1].1, b"half of one",
        "readers keep what the dead publisher sent"
    );
    for (seq, data) in &got[2..] {
        assert_eq!(data, &segment_bytes(*seq));
    }
    server.shutdown().await;
}

/// The task owning publisher 1 is aborted mid-segment (its writer is dropped without close, which
/// cuts the POST); a restarted publisher continues and the reader follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_publisher_task_and_reset_publisher_continue_the_channel() {
    let server = common::autocreate_server().await;
    let url = format!("{}/killed", server.url());
    server.channels().create("killed", None).unwrap();
    let (tx, mut rx) = watch::channel(0);
    let reader = spawn_reader(Subscriber::new(&url, sub_from(0)), tx);

    let (wrote_tx, wrote_rx) = tokio::sync::oneshot::channel();
    let purl = url.clone();
    let p1 = tokio::spawn(async move {
        let mut p = Publisher::new(&purl, fast_publisher());
        publish_segment(&mut p, 0).await;
        let mut seg = p.next_segment().await.unwrap();
        seg.write(Bytes::from_static(b"cut short")).await.unwrap();
        let _ = wrote_tx.send(());
        std::future::pending::<()>().await;
        drop((seg, p));
    });
    within("p1 writes", wrote_rx).await.unwrap();
    wait_progress(&mut rx, 1).await;
    // Kill it only once the server holds its bytes of segment 1 (the write head moved to 2).
    wait_next_seq(&url, 2).await;
    p1.abort();
    let _ = p1.await;

    let mut p2 = Publisher::new(
        &url,
        PublisherOptions {
            reset: true,
            ..fast_publisher()
        },
    );
    for seq in 2..4 {
        within("reset publisher", publish_segment(&mut p2, seq)).await;
    }
    wait_progress(&mut rx, 4).await;
    p2.close().await.unwrap();
    let (got, _) = within("reader end", reader).await.unwrap();
    let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    assert_eq!(got[1].1, b"cut short");
    assert_eq!(got[3].1, segment_bytes(3));
    server.shutdown().await;
}

/// The channel's write head, from `GET {url}/next`.
async fn next_seq(url: &str) -> i64 {
    let resp = reqwest::get(format!("{url}/next")).await.unwrap();
    resp.text().await.unwrap().trim().parse().unwrap()
}

/// Waits until the server has the first byte of segment `next - 1`.
async fn wait_next_seq(url: &str, next: i64) {
    within("segment reached the server", async {
        while next_seq(url).await != next {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn rebind(addr: std::net::SocketAddr) -> Server {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let cfg = ServerConfig {
            autocreate: true,
            ..Default::default()
        };
        match Server::bind(addr, cfg).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("rebind {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_subscriber_survive_a_server_restart() {
    let server = common::autocreate_server().await;
    let addr = server.local_addr();
    let url = format!("{}/restart", server.url());
    server.channels().create("restart", None).unwrap();
    let (tx, mut rx) = watch::channel(0);
    let reader = spawn_reader(Subscriber::new(&url, sub_from(0)), tx);
    let mut p = Publisher::new(&url, fast_publisher());
    for seq in 0..10 {
        if seq >= 3 {
            wait_progress(&mut rx, seq as usize - 3).await;
        }
        publish_segment(&mut p, seq).await;
    }
    wait_progress(&mut rx, 10).await;
    // The reader's preconnected GET of seq 10 must have reached the server: the server answers
    // requests that arrive during its shutdown with 404 (channel gone), which ends a subscription.
    parked(&server.channels(), "restart", 10, 1, 0).await;

    // Restart: every channel closes, the preconnected POST and GET are woken, the port rebinds.
    within("shutdown", server.shutdown()).await;
    let server = rebind(addr).await;
    server.channels().create("restart", None).unwrap();

    for seq in 10..20 {
        wait_progress(&mut rx, seq as usize - 3).await;
        within("publish after restart", publish_segment(&mut p, seq)).await;
    }
    wait_progress(&mut rx, 20).await;
    assert_eq!(
        p.state(),
        PublisherState::Active {
            consecutive_failures: 0
        }
    );
    // The preconnected POST woken by the shutdown was replaced with a fresh one: nothing failed.
    assert_eq!(p.stats().segments_failed, 0, "{:?}", p.stats());
    p.close().await.unwrap();
    let (got, _) = within("reader end", reader).await.unwrap();
    let seqs: Vec<i64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    for (seq, data) in &got {
        assert_eq!(data, &segment_bytes(*seq), "segment {seq} differs");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_ends_on_404_after_the_publisher_closes() {
    let server = common::autocreate_server().await;
    let url = format!("{}/ending", server.url());
    let mut p = Publisher::new(&url, fast_publisher());
    let mut sub = Subscriber::new(&url, sub_from(0));
    for seq in 0..2 {
        publish_segment(&mut p, seq).await;
    }
    for seq in 0..2 {
        let mut seg = within("seg", sub.next_segment()).await.unwrap().unwrap();
        assert_eq!(seg.seq(), seq);
        assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(seq));
    }
    // The subscriber is now waiting (preconnected) on seq 2.
    let waiting = tokio::spawn(async move { (sub.next_segment().await.map(|s| s.is_none()), sub) });
    parked(&server.channels(), "ending", 2, 1, 0).await;
    within("close", p.close()).await.unwrap();
    let (ended, mut sub) = within("subscriber end", waiting).await.unwrap();
    assert!(ended.unwrap(), "a closed channel ends the subscription");
    assert!(sub.next_segment().await.unwrap().is_none(), "stays ended");
    assert!(
        !sub.channel_missing(),
        "an ordinary end, not a missing channel"
    );
    // A new subscriber of the deleted channel ends at once: for it, the channel is missing.
    let mut late = Subscriber::new(&url, SubscriberOptions::default());
    assert!(within("late", late.next_segment()).await.unwrap().is_none());
    assert!(late.channel_missing());
    server.shutdown().await;
}

/// A channel that exists but never got a segment (created by the client, the runner not yet
/// started) and is then deleted ends its waiting subscriber as an ordinary end: it was there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_deleted_before_its_first_segment_ends_as_an_ordinary_end() {
    let server = common::autocreate_server().await;
    server.channels().create("empty", None).unwrap();
    let mut sub = Subscriber::new(
        format!("{}/empty", server.url()),
        SubscriberOptions::default(),
    );
    let waiting = tokio::spawn(async move { (sub.next_segment().await.map(|s| s.is_none()), sub) });
    parked(&server.channels(), "empty", 0, 1, 0).await;
    assert!(server.channels().close("empty"));
    let (ended, sub) = within("subscriber end", waiting).await.unwrap();
    assert!(ended.unwrap());
    assert!(!sub.channel_missing(), "it existed: an ordinary end");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_segment_byte_cap_cuts_only_the_runaway_segment() {
    let server = common::autocreate_server().await;
    let url = format!("{}/capped", server.url());
    let mut p = Publisher::new(&url, fast_publisher());
    let sizes = [500usize, 5000, 700];
    for size in sizes {
        let mut seg = p.next_segment().await.unwrap();
        for piece in vec![b'a'; size].chunks(250) {
            seg.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        seg.close().await.unwrap();
    }
    let mut sub = Subscriber::new(
        &url,
        SubscriberOptions {
            start_seq: 0,
            max_segment_bytes: 1000,
            ..Default::default()
        },
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        let mut seg = within("seg", sub.next_segment()).await.unwrap().unwrap();
        got.push((
            seg.seq(),
            within("read", read_all(&mut seg)).await.map(|d| d.len()),
        ));
    }
    assert!(matches!(got[0], (0, Ok(500))));
    assert!(
        matches!(
            &got[1],
            (
                1,
                Err(SubscribeError::SegmentTooLarge {
                    seq: 1,
                    limit: 1000,
                    ..
                })
            )
        ),
        "{got:?}"
    );
    assert!(matches!(got[2], (2, Ok(700))));
    assert_eq!(sub.stats().oversize_segments, 1);
    p.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_clear_error_for_both_clients() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/nobody");
    let mut sub = Subscriber::new(
        &url,
        SubscriberOptions {
            retry_delay: Duration::from_millis(10),
            ..Default::default()
        },
    );
    let err = within("subscribe", sub.next_segment()).await.err().unwrap();
    assert!(matches!(err, SubscribeError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("connection refused") && msg.contains("is the trickle server running?"),
        "{msg}"
    );
    assert_eq!(sub.stats().retries, 4, "5 attempts");

    let p = Publisher::new(&url, fast_publisher());
    let err = within("close", p.close()).await.unwrap_err();
    assert!(matches!(err, PublishError::Unreachable { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_to_a_missing_channel_without_autocreate_reports_channel_gone() {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    let url = format!("{}/missing", server.url());
    let mut p = Publisher::new(
        &url,
        PublisherOptions {
            retry_delay: Duration::from_millis(10),
            ..Default::default()
        },
    );
    let mut seg = p.next_segment().await.unwrap();
    let r = match seg.write(Bytes::from_static(b"x")).await {
        Ok(()) => seg.close().await,
        Err(e) => Err(e),
    };
    let err = r.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(
        p.state(),
        PublisherState::Active {
            consecutive_failures: 1
        }
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Reconnect through a server outage (`reconnect_window`)
// ---------------------------------------------------------------------------------------------

/// A server behind a loopback TCP proxy, so it can be "killed" like a process (`kill -9`): every
/// client connection is cut at once mid-stream, nothing is closed politely, and a restart is a
/// fresh server (no channels) behind the same address.
struct Killable {
    addr: std::net::SocketAddr,
    server: Option<Server>,
    proxy: tokio::task::JoinHandle<()>,
}

impl Killable {
    /// Serves `addr` (port 0 for any), retrying the bind while the old socket lingers.
    async fn start(addr: std::net::SocketAddr) -> Killable {
        let server = common::autocreate_server().await;
        let upstream = server.local_addr();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            // Each connection's task lives in this set: aborting the proxy drops them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Killable {
            addr,
            server: Some(server),
            proxy,
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every client connection and stops listening; the server behind is thrown away.
    async fn kill(mut self) {
        self.proxy.abort();
        let _ = (&mut self.proxy).await;
        if let Some(server) = self.server.take() {
            tokio::spawn(server.shutdown());
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.proxy.abort();
    }
}

fn reconnecting_publisher(window: Duration) -> PublisherOptions {
    PublisherOptions {
        retry_delay: Duration::from_millis(50),
        reconnect_window: window,
        ..Default::default()
    }
}

fn reconnecting_subscriber(start_seq: i64, window: Duration) -> SubscriberOptions {
    SubscriberOptions {
        start_seq,
        retries: 2,
        retry_delay: Duration::from_millis(50),
        reconnect_window: window,
        ..Default::default()
    }
}

/// Reads from `seg` until `n` bytes arrived.
async fn read_exactly(seg: &mut SegmentReader, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < n {
        match within("segment bytes", seg.chunk()).await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk),
            other => panic!("segment ended early after {} bytes: {other:?}", out.len()),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_past_the_retries_both_reconnect_and_the_broken_segment_resumes_byte_exact() {
    let server = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr();
    let url = format!("{}/outage", server.url());
    let window = Duration::from_secs(20);
    let mut p = Publisher::new(&url, reconnecting_publisher(window));
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, window));
    publish_segment(&mut p, 0).await;
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));

    // Segment 1: part A arrives, then the server dies mid-segment.
    let (a, b) = (Bytes::from(vec![b'a'; 3000]), Bytes::from(vec![b'b'; 5000]));
    let mut w = p.next_segment().await.unwrap();
    w.write(a.clone()).await.unwrap();
    let mut seg = within("seg 1", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(seg.seq(), 1);
    let mut got = read_exactly(&mut seg, a.len()).await;
    server.kill().await;

    // While it is down (well past both retry budgets), the publisher writes part B and closes.
    let writer = tokio::spawn(async move {
        w.write(b.clone()).await?;
        w.close().await?;
        publish_segment(&mut p, 2).await;
        Ok::<_, PublishError>(p)
    });
    let reader = tokio::spawn(async move {
        let rest = read_all(&mut seg).await;
        (rest, seg, sub)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !writer.is_finished() && !reader.is_finished(),
        "both wait for the server"
    );
    // Restarted on the same port, the channel not recreated yet: the first requests get 404.
    let server = Killable::start(addr).await;
    let p = within("publisher resumes", writer).await.unwrap().unwrap();
    let (rest, seg, mut sub) = within("reader resumes", reader).await.unwrap();
    got.extend(rest.expect("segment 1 resumed"));
    assert_eq!(seg.seq(), 1);
    assert_eq!(got.len(), 8000, "segment 1: no byte lost or repeated");
    assert!(got[..3000].iter().all(|&c| c == b'a') && got[3000..].iter().all(|&c| c == b'b'));
    let mut seg = within("seg 2", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(seg.seq(), 2);
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(2));

    let (ps, ss) = (p.stats(), sub.stats());
    assert!(ps.reconnects >= 1 && ps.segments_failed == 0, "{ps:?}");
    assert_eq!(
        p.state(),
        PublisherState::Active {
            consecutive_failures: 0
        }
    );
    assert_eq!((ss.resumed_segments, ss.broken_segments), (1, 0), "{ss:?}");
    assert!(ss.reconnects >= 1, "{ss:?}");
    p.close().await.unwrap();
    assert!(within("end", sub.next_segment()).await.unwrap().is_none());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_end_still_ends_a_reconnecting_subscriber_promptly() {
    let server = common::autocreate_server().await;
    let url = format!("{}/normal-end", server.url());
    let mut p = Publisher::new(&url, reconnecting_publisher(Duration::from_secs(60)));
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, Duration::from_secs(60)));
    publish_segment(&mut p, 0).await;
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));
    // Waiting (preconnected) on seq 1 when the publisher closes the channel.
    let waiting = tokio::spawn(async move { (sub.next_segment().await.map(|s| s.is_none()), sub) });
    parked(&server.channels(), "normal-end", 1, 1, 0).await;
    let closed_at = std::time::Instant::now();
    p.close().await.unwrap();
    let (ended, sub) = within("subscriber end", waiting).await.unwrap();
    assert!(ended.unwrap(), "a closed channel ends the subscription");
    assert!(!sub.channel_missing(), "an ordinary end");
    assert!(
        closed_at.elapsed() < Duration::from_secs(5),
        "ended after {:?}, not after the 60 s reconnect window",
        closed_at.elapsed()
    );
    // A channel that never existed also ends a fresh subscriber at once (no outage seen).
    let mut never = Subscriber::new(
        format!("{}/never", server.url()),
        reconnecting_subscriber(0, Duration::from_secs(60)),
    );
    assert!(within("never", never.next_segment())
        .await
        .unwrap()
        .is_none());
    assert!(never.channel_missing(), "never there: missing, not ended");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_window_0_keeps_the_reference_retries() {
    let server = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let url = format!("{}/no-reconnect", server.url());
    let mut p = Publisher::new(&url, reconnecting_publisher(Duration::ZERO));
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, Duration::ZERO));
    publish_segment(&mut p, 0).await;
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));
    let mut w = p.next_segment().await.unwrap();
    w.write(Bytes::from_static(b"part")).await.unwrap();
    let mut seg = within("seg 1", sub.next_segment()).await.unwrap().unwrap();
    read_exactly(&mut seg, 4).await;
    server.kill().await;
    // The broken body is an error at once; the next request gives up after its 2 attempts.
    let broken = within("broken body", read_all(&mut seg)).await;
    assert!(
        matches!(broken, Err(SubscribeError::Body { .. })),
        "{broken:?}"
    );
    let next = within("subscriber gives up", sub.next_segment()).await;
    assert!(
        matches!(next, Err(SubscribeError::Unreachable { .. })),
        "{:?}",
        next.map(|s| s.map(|s| s.seq()))
    );
    // The segment is retried once, then fails; the publisher counts it and stays usable.
    let closed = within("segment fails", async {
        match w.write(Bytes::from_static(b"more")).await {
            Ok(()) => w.close().await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(
        matches!(closed, Err(PublishError::Unreachable { .. })),
        "{closed:?}"
    );
    let (ps, ss) = (p.stats(), sub.stats());
    assert_eq!(
        (ps.segments_failed, ps.retries, ps.reconnects),
        (1, 1, 0),
        "{ps:?}"
    );
    assert_eq!(
        (ss.broken_segments, ss.resumed_segments, ss.reconnects),
        (1, 0, 0),
        "{ss:?}"
    );
    assert_eq!(
        p.state(),
        PublisherState::Active {
            consecutive_failures: 1
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_window_fails_as_before() {
    let server = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let url = format!("{}/too-long", server.url());
    let window = Duration::from_millis(600);
    let mut p = Publisher::new(&url, reconnecting_publisher(window));
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, window));
    publish_segment(&mut p, 0).await;
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));
    let mut w = p.next_segment().await.unwrap();
    w.write(Bytes::from_static(b"part")).await.unwrap();
    let mut seg = within("seg 1", sub.next_segment()).await.unwrap().unwrap();
    read_exactly(&mut seg, 4).await;
    server.kill().await;
    // Never restarted: the segment reader, the next request and the publisher give up.
    let broken = within("broken body", read_all(&mut seg)).await;
    assert!(
        matches!(broken, Err(SubscribeError::Body { .. })),
        "{broken:?}"
    );
    let next = within("subscriber gives up", sub.next_segment()).await;
    assert!(next.is_err(), "{:?}", next.map(|s| s.map(|s| s.seq())));
    let mut last = None;
    for _ in 0..3 {
        let r = within("segment fails", async {
            let r = w.write(Bytes::from_static(b"more")).await;
            match r {
                Ok(()) => w.close().await,
                Err(e) => Err(e),
            }
        })
        .await;
        last = Some(r.unwrap_err());
        if matches!(last, Some(PublishError::Terminal { .. })) {
            break;
        }
        w = match p.next_segment().await {
            Ok(w) => w,
            Err(e) => {
                last = Some(e);
                break;
            }
        };
    }
    let last = last.unwrap();
    assert!(matches!(last, PublishError::Terminal { .. }), "{last}");
    assert!(matches!(p.state(), PublisherState::Terminal { .. }));
    let ss = sub.stats();
    assert_eq!((ss.broken_segments, ss.resumed_segments), (1, 0), "{ss:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_segment_never_re_sent_is_given_up_once_the_publisher_moves_on() {
    let server = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr();
    let url = format!("{}/moved-on", server.url());
    let window = Duration::from_secs(20);
    let mut p = Publisher::new(&url, reconnecting_publisher(window));
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, window));
    publish_segment(&mut p, 0).await;
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));
    let mut w = p.next_segment().await.unwrap();
    w.write(Bytes::from_static(b"lost with the server"))
        .await
        .unwrap();
    let mut seg = within("seg 1", sub.next_segment()).await.unwrap().unwrap();
    read_exactly(&mut seg, 4).await;
    server.kill().await;
    drop((w, p));
    let reader = tokio::spawn(async move { (read_all(&mut seg).await, sub) });
    // The fault: the server stays down for 0.5 s (a duration, not a wait for an event).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another publisher (not re-sending segment 1) carries on at seq 2 on the restarted server.
    let _server = Killable::start(addr).await;
    let http = reqwest::Client::new();
    for seq in [2, 3] {
        let resp = http
            .post(format!("{url}/{seq}"))
            .body(segment_bytes(seq))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let (rest, mut sub) = within("segment 1 given up", reader).await.unwrap();
    assert!(
        matches!(rest, Err(SubscribeError::Body { .. })),
        "{rest:?} {:?}",
        sub.stats()
    );
    let mut seg = within("seg 2", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(seg.seq(), 2);
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(2));
    let ss = sub.stats();
    assert_eq!((ss.broken_segments, ss.resumed_segments), (1, 0), "{ss:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_deleted_on_a_live_server_fails_the_segment_promptly_despite_the_window() {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    server.channels().create("deleted", None).unwrap();
    let url = format!("{}/deleted", server.url());
    let mut p = Publisher::new(&url, reconnecting_publisher(Duration::from_secs(60)));
    let mut seg = p.next_segment().await.unwrap();
    seg.write(Bytes::from_static(b"open")).await.unwrap();
    // The orchestrator ends the job: not an outage, so no 60 s of reconnecting.
    assert!(server.channels().close("deleted"));
    let started = std::time::Instant::now();
    let r = within("segment fails", async {
        match seg.write(Bytes::from_static(b"more")).await {
            Ok(()) => seg.close().await,
            Err(e) => Err(e),
        }
    })
    .await;
    assert!(
        matches!(
            r,
            Err(PublishError::ChannelGone { .. } | PublishError::ChannelClosed { .. })
        ),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(p.stats().reconnects, 0);
    server.shutdown().await;
}

/// A reader whose segment breaks because the runner deleted the channel on a live server (it
/// lagged behind at the end of a job) gives the segment up within a few seconds: the 404 of a
/// server that never went away is not an outage worth the whole reconnect window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_cut_by_a_deleted_channel_ends_the_lagging_reader_promptly_despite_the_window() {
    let server = Server::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
        .await
        .unwrap();
    server.channels().create("lagging", None).unwrap();
    let url = format!("{}/lagging", server.url());
    let mut p = Publisher::new(&url, reconnecting_publisher(Duration::from_secs(60)));
    let mut seg = p.next_segment().await.unwrap();
    seg.write(Bytes::from_static(b"open\n")).await.unwrap();
    let mut sub = Subscriber::new(&url, reconnecting_subscriber(0, Duration::from_secs(60)));
    let mut reader = within("segment 0", sub.next_segment())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read_exactly(&mut reader, 5).await, b"open\n");
    // The runner races ahead: segment 0 falls out of the server's window (its body is cut) and
    // the job ends (the channel is deleted) before this reader reads on.
    // More than the socket buffers hold, so the cut reaches the reader mid-body.
    seg.write(Bytes::from(vec![b'x'; 16 << 20])).await.unwrap();
    seg.close().await.unwrap();
    for _ in 0..8 {
        let mut next = p.next_segment().await.unwrap();
        next.write(Bytes::from_static(b"later\n")).await.unwrap();
        next.close().await.unwrap();
    }
    assert!(server.channels().close("lagging"));
    let started = std::time::Instant::now();
    // The body ends or breaks; either way the reader is done with it well before the window.
    let end = within("the cut segment ends", async {
        loop {
            match reader.chunk().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "held for {:?} ({end:?})",
        started.elapsed()
    );
    assert_eq!(sub.stats().reconnects, 0);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Closing a channel while the next segment's POST is preconnected
// ---------------------------------------------------------------------------------------------

/// What [`HoldingProxy`] saw of the race between a held preconnect and the DELETE.
#[derive(Debug, Default, Clone)]
struct HoldReport {
    /// The preconnect's request line was caught and held.
    held: bool,
    /// When the DELETE arrived, the preconnect's client side had already ended.
    ended_before_delete: Option<bool>,
    /// The held connection is finished: its bytes went to the server and the server answered
    /// (or closed).
    done: bool,
}

/// A loopback proxy in front of the server that makes the race of a slow server happen every
/// time: it connects upstream at once (the server accepts the connection), but holds back the
/// bytes of the request whose line starts with `hold` (the next segment's preconnected POST)
/// until the channel's DELETE was answered, as a busy server reads a request late. Before it
/// forwards the DELETE it waits (up to 5 s) for the held request's client to end, to record
/// whether the publisher's preconnect outlived its DELETE (the DELETE may be any request of a
/// keep-alive connection). Everything else is piped unchanged.
async fn holding_proxy(
    upstream: std::net::SocketAddr,
    hold: String,
    delete: String,
) -> (std::net::SocketAddr, watch::Receiver<HoldReport>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, rx) = watch::channel(HoldReport::default());
    let report = std::sync::Arc::new(report);
    // `released` turns true once the DELETE's answer went back to the publisher.
    let (release, released) = watch::channel(false);
    let release = std::sync::Arc::new(release);
    // `client_ended` turns true once the held request's client closed its side.
    let (client_end, client_ended) = watch::channel(false);
    let client_end = std::sync::Arc::new(client_end);
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (hold, delete) = (hold.clone(), delete.clone());
            let (report, release, mut released) =
                (report.clone(), release.clone(), released.clone());
            let (client_end, mut client_ended) = (client_end.clone(), client_ended.clone());
            tokio::spawn(async move {
                // The request line decides what happens to this connection.
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(2).any(|w| w == b"\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(hold.as_bytes()) {
                    report.send_modify(|r| r.held = true);
                    // Hold everything the client sends; note when it ends its side.
                    let (mut cr, mut cw) = client.into_split();
                    let reading = tokio::spawn(async move {
                        let mut rest = Vec::new();
                        let _ = cr.read_to_end(&mut rest).await;
                        client_end.send_replace(true);
                        rest
                    });
                    let _ = released.wait_for(|r| *r).await;
                    let _ = server.write_all(&head).await;
                    let rest = reading.await.unwrap_or_default();
                    let _ = server.write_all(&rest).await;
                    let _ = server.shutdown().await;
                    // Whatever the server answers goes back (the client may be gone).
                    let mut answer = Vec::new();
                    let _ = server.read_to_end(&mut answer).await;
                    let _ = cw.write_all(&answer).await;
                    report.send_modify(|r| r.done = true);
                    return;
                }
                // Any other connection is piped, request by request: the clients reuse
                // keep-alive connections, so the DELETE may be any request of one. It waits for
                // the held request's client to end before it goes up; once its answer is back
                // with the client, the hold is released.
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let deleting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let down = {
                    let deleting = deleting.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n @ 1..) = sr.read(&mut buf).await {
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            if deleting.load(std::sync::atomic::Ordering::SeqCst) {
                                release.send_replace(true);
                            }
                        }
                        let _ = cw.shutdown().await;
                    })
                };
                let mut chunk = head;
                loop {
                    // Requests on a connection are sequential: a new one starts a read.
                    if chunk.starts_with(delete.as_bytes()) {
                        let ended = tokio::time::timeout(
                            Duration::from_secs(5),
                            client_ended.wait_for(|e| *e),
                        )
                        .await
                        .is_ok();
                        report.send_modify(|r| r.ended_before_delete = Some(ended));
                        deleting.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    if sw.write_all(&chunk).await.is_err() {
                        break;
                    }
                    chunk = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf[..n].to_vec(),
                    };
                }
                let _ = sw.shutdown().await;
                let _ = down.await;
            });
        }
    });
    (addr, rx)
}

/// The flake of `cli_trickle.rs::publish_jsonl_from_stdin_and_subscribe_jsonl_prints_every_line`
/// ("subscribe did not end" while the channel still existed), made to happen every time: the
/// publisher's preconnected POST of the next segment reaches a busy server only after the
/// publisher's DELETE, and a server with autocreate used to create the channel again from it, so
/// a subscriber waiting for the end waited forever. The publisher must end its preconnect before
/// the DELETE, and the server must not recreate a channel from a request that was already on its
/// way (on a connection accepted before the delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preconnect_the_server_reads_after_the_delete_does_not_bring_the_channel_back() {
    let server = common::autocreate_server().await;
    let (addr, mut report) = holding_proxy(
        server.local_addr(),
        "POST /late/1 ".into(),
        "DELETE /late ".into(),
    )
    .await;
    let url = format!("http://{addr}/late");
    let mut p = Publisher::new(&url, fast_publisher());
    publish_segment(&mut p, 0).await;
    // A subscriber that read segment 0 waits for the next one, as `subscribe` does.
    let mut sub = Subscriber::new(format!("{}/late", server.url()), sub_from(0));
    let mut seg = within("seg 0", sub.next_segment()).await.unwrap().unwrap();
    assert_eq!(read_all(&mut seg).await.unwrap(), segment_bytes(0));
    within(
        "the preconnect of seq 1 is held",
        report.wait_for(|r| r.held),
    )
    .await
    .unwrap();
    within("close", p.close()).await.unwrap();
    match tokio::time::timeout(LIMIT, sub.next_segment()).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(seg))) => panic!("segment {} after the close", seg.seq()),
        Ok(Err(e)) => panic!("the subscription failed: {e}"),
        Err(_) => panic!(
            "the subscriber did not end; channels {:?}; {:?}",
            server.channels().list(),
            *report.borrow()
        ),
    }
    let seen = within("the held request is answered", report.wait_for(|r| r.done))
        .await
        .unwrap()
        .clone();
    assert_eq!(
        seen.ended_before_delete,
        Some(true),
        "the preconnected POST was still open when the DELETE went out"
    );
    assert!(
        server.channels().list().is_empty(),
        "the channel came back: {:?}",
        server.channels().list()
    );
    server.shutdown().await;
}
