//! Publisher and subscriber against the real trickle server on loopback TCP.

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use trickle::publisher::{PublishError, Publisher, PublisherOptions, PublisherState};
use trickle::server::{Server, ServerConfig};
use trickle::subscriber::{SegmentReader, SubscribeError, Subscriber, SubscriberOptions};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

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
    let server = start_server().await;
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
    let server = start_server().await;
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
    let server = start_server().await;
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
    // Give the reader time to hit the 470 and wait at the live edge, then write it.
    tokio::time::sleep(Duration::from_millis(300)).await;
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

/// Publisher 1 writes segment 0, half of segment 1, then hangs with its connections open (its
/// writer is leaked, never closed nor dropped): readers of segment 1 would wait forever.
/// Publisher 2 restarts with `reset`: it starts at the channel's `/next` and its reset header
/// closes segment 1, so the readers move on to its segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_publisher_is_replaced_by_a_reset_publisher() {
    let server = start_server().await;
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
    let server = start_server().await;
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
    let server = start_server().await;
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
    // Let the reader's preconnected GET of seq 10 reach the server: the server answers requests
    // that arrive during its shutdown with 404 (channel gone), which ends any subscription.
    tokio::time::sleep(Duration::from_millis(300)).await;

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
    assert!(
        p.stats().retries >= 1,
        "the woken POST was retried: {:?}",
        p.stats()
    );
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
    let server = start_server().await;
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
    tokio::time::sleep(Duration::from_millis(100)).await;
    within("close", p.close()).await.unwrap();
    let (ended, mut sub) = within("subscriber end", waiting).await.unwrap();
    assert!(ended.unwrap(), "a closed channel ends the subscription");
    assert!(sub.next_segment().await.unwrap().is_none(), "stays ended");
    // A new subscriber of the deleted channel ends at once.
    let mut late = Subscriber::new(&url, SubscriberOptions::default());
    assert!(within("late", late.next_segment()).await.unwrap().is_none());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_segment_byte_cap_cuts_only_the_runaway_segment() {
    let server = start_server().await;
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
