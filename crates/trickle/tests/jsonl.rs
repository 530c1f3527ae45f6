//! JSONL channels (writer, reader, typed messages) against the real trickle server on loopback.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use trickle::jsonl::{
    JsonlError, JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions,
    JSONL_CONTENT_TYPE,
};
use trickle::messages::EventMessage;
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::server::Server;
use trickle::subscriber::{Subscriber, SubscriberOptions};

mod common;

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A server with one JSONL channel; returns the channel URL.
async fn start(name: &str) -> (Server, String) {
    let server = common::autocreate_server().await;
    server
        .channels()
        .create(name, Some(JSONL_CONTENT_TYPE))
        .unwrap();
    let url = format!("{}/{}", server.url(), name);
    (server, url)
}

fn publisher(url: &str) -> Publisher {
    Publisher::new(
        url,
        PublisherOptions {
            content_type: JSONL_CONTENT_TYPE.into(),
            retry_delay: Duration::from_millis(100),
            ..Default::default()
        },
    )
}

fn reader(url: &str, max_line_bytes: usize) -> JsonlReader {
    JsonlReader::new(
        Subscriber::new(
            url,
            SubscriberOptions {
                start_seq: 0,
                ..Default::default()
            },
        ),
        JsonlReaderOptions { max_line_bytes },
    )
}

#[derive(Debug, Deserialize, PartialEq)]
struct Numbered {
    i: u64,
}

/// Reads until the channel ends, checking order as it goes.
fn spawn_numbered_reader(
    mut r: JsonlReader,
    progress: tokio::sync::watch::Sender<u64>,
) -> tokio::task::JoinHandle<(Vec<u64>, JsonlReader)> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(m) = r.next::<Numbered>().await.unwrap() {
            got.push(m.i);
            progress.send_replace(got.len() as u64);
        }
        (got, r)
    })
}

/// `got` is exactly 0..total (reports the first difference, not the whole list).
fn assert_in_order(got: &[u64], total: u64) {
    if let Some(i) = (0..total as usize).find(|&i| got.get(i) != Some(&(i as u64))) {
        panic!(
            "message {i} is {:?} (got {} of {total})",
            got.get(i),
            got.len()
        );
    }
    assert_eq!(got.len() as u64, total, "extra messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_round_trip_across_size_rotations() {
    let (server, url) = start("sized").await;
    let (tx, mut rx) = tokio::sync::watch::channel(0);
    let reading = spawn_numbered_reader(reader(&url, 1 << 20), tx);
    let w = JsonlWriter::new(
        publisher(&url),
        JsonlWriterOptions {
            max_segment_bytes: 4096,
            ..Default::default()
        },
    );
    let total = 5000u64;
    for i in 0..total {
        // The server keeps 5 segments: stay within ~2 segments of the reader.
        let behind = i % 50 == 0 && i >= 100;
        if behind
            && tokio::time::timeout(LIMIT, rx.wait_for(|n| *n + 100 >= i))
                .await
                .is_err()
        {
            panic!(
                "stalled at {i}: reader {} writer {:?}",
                *rx.borrow(),
                w.stats()
            );
        }
        let pad = "x".repeat((i % 40) as usize);
        w.write(&json!({"i": i, "pad": pad})).await.unwrap();
    }
    // Lines arrive before their segment ends; closing deletes the channel, which would end a
    // reader still more than a segment behind, so wait for it first.
    within("flush", w.flush()).await.unwrap();
    within("reader caught up", rx.wait_for(|n| *n == total))
        .await
        .unwrap();
    within("close", w.close()).await.unwrap();
    let (got, r) = within("reader end", reading).await.unwrap();
    assert_in_order(&got, total);

    let ws = w.stats();
    assert_eq!(
        (
            ws.lines_accepted,
            ws.lines_written,
            ws.lines_acked,
            ws.lines_lost
        ),
        (total, total, total, 0)
    );
    assert!(ws.rotations_by_size >= 20, "{ws:?}");
    assert!(ws.chunks <= ws.lines_written, "{ws:?}");
    let rs = r.stats();
    assert_eq!((rs.lines, rs.bad_lines()), (total, 0));
    assert_eq!(rs.subscriber.jumps, 0);
    assert!(rs.subscriber.segments >= 20, "{rs:?}");
    // No segment outgrew the bound.
    assert!(rs.subscriber.bytes <= ws.segments * 4096, "{rs:?} {ws:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_based_rotation_delivers_everything_in_order() {
    let (server, url) = start("timed").await;
    let (tx, mut rx) = tokio::sync::watch::channel(0);
    let reading = spawn_numbered_reader(reader(&url, 1 << 20), tx);
    let w = JsonlWriter::new(
        publisher(&url),
        JsonlWriterOptions {
            rotate_every: Duration::from_millis(60),
            ..Default::default()
        },
    );
    for i in 0..20u64 {
        w.write(&json!({"i": i})).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    within("reader caught up", rx.wait_for(|n| *n == 20))
        .await
        .unwrap();
    within("close", w.close()).await.unwrap();
    let (got, _) = within("reader end", reading).await.unwrap();
    assert_in_order(&got, 20);
    let ws = w.stats();
    assert!(ws.rotations_by_time >= 2, "{ws:?}");
    assert!(ws.segments >= 3, "{ws:?}");
    assert_eq!(ws.lines_acked, 20);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_yields_each_line_before_its_segment_ends() {
    let (server, url) = start("prompt").await;
    let w = JsonlWriter::new(publisher(&url), JsonlWriterOptions::default());
    let mut r = reader(&url, 1 << 20);
    for i in 0..3u64 {
        w.write(&json!({"i": i})).await.unwrap();
        // The segment rotates only after 10 s: the line must arrive long before that.
        let m: Numbered = within("line", r.next()).await.unwrap().unwrap();
        assert_eq!(m.i, i);
    }
    assert_eq!(
        w.stats().segments,
        1,
        "all three lines are in the one open segment"
    );
    within("close", w.close()).await.unwrap();
    assert!(within("end", r.next::<Numbered>()).await.unwrap().is_none());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_counted_by_kind_and_skipped() {
    let (server, url) = start("dirty").await;
    let mut p = publisher(&url);
    let max = 64;
    // Segment 0: good lines around every kind of bad line; it ends in the middle of a line.
    let mut seg = p.next_segment().await.unwrap();
    let pieces: Vec<&[u8]> = vec![
        b"{\"i\":1}\n",
        b"{garbage here\n",
        b"{\"i\":2}\n[1]\n\"x\"\n",
        b"{\"i\":\"\xff\xfe\"}\n",
        b"{\"i\":3}\n{\"j\":4}\n{\"i\":",
        b"4}\n",
        &[b'{'; 50],
        &[b' '; 50],
        b"}\n{\"i\":5}\n\n{\"i\":6",
    ];
    for piece in pieces {
        seg.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    seg.close().await.unwrap();
    // Segment 1 is independent: a good line, and a last line without its newline.
    let mut seg = p.next_segment().await.unwrap();
    seg.write(Bytes::from_static(b"{\"i\":7}\n{\"i\":8}"))
        .await
        .unwrap();
    seg.close().await.unwrap();

    let mut r = reader(&url, max);
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(
            within("read", r.next::<Numbered>())
                .await
                .unwrap()
                .unwrap()
                .i,
        );
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 7, 8]);
    p.close().await.unwrap();
    assert!(within("end", r.next::<Numbered>()).await.unwrap().is_none());
    let s = r.stats();
    assert_eq!(s.not_json, 1, "{s:?}");
    assert_eq!(s.not_object, 2, "{s:?}");
    assert_eq!(s.not_utf8, 1, "{s:?}");
    assert_eq!(s.mismatch, 1, "{s:?}");
    assert_eq!(s.oversize, 1, "{s:?}");
    assert_eq!(s.partial, 1, "{s:?}");
    assert_eq!(s.unterminated, 1, "{s:?}");
    assert_eq!(s.bad_lines(), 7);
    assert_eq!(s.lines, 7);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_event_messages_cross_the_channel_byte_exact() {
    let (server, url) = start("events").await;
    let w = JsonlWriter::new(publisher(&url), JsonlWriterOptions::default());
    let mut r = reader(&url, 5 << 20);
    let envelope = r#"{"id":"5b6c","type":"stream_trace","timestamp":"1717","data":{"type":"stream_heartbeat","fps_in":29.97,"z":1e2,"note":"\u00e9"}}"#;
    let lines = [
        format!(r#"{{"type":"telemetry","event":{envelope}}}"#),
        r#"{"type":"runner_ready","runner_job_id":"job-1","startup_ms":8123}"#.to_string(),
        r#"{"type":"logs","lines":["x - ERROR - boom"]}"#.to_string(),
        r#"{"type":"from_the_future","payload":[1,2]}"#.to_string(),
    ];
    for line in &lines {
        w.write_line(Bytes::from(line.clone())).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..lines.len() {
        got.push(
            within("read", r.next::<EventMessage>())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let EventMessage::Telemetry(t) = &got[0] else {
        panic!("{:?}", got[0])
    };
    assert_eq!(
        t.event.get(),
        envelope,
        "the envelope is forwarded byte for byte"
    );
    assert!(
        matches!(&got[1], EventMessage::RunnerReady(r) if r.runner_job_id.as_deref() == Some("job-1"))
    );
    assert!(matches!(&got[2], EventMessage::Logs(l) if l.lines.len() == 1));
    assert_eq!(got[3].type_name(), "from_the_future");
    // Re-encoding known types gives back what went in; an unknown type keeps every field (its
    // keys come back sorted, which is the same JSON object).
    for (line, msg) in lines.iter().zip(&got).take(3) {
        assert_eq!(&serde_json::to_string(msg).unwrap(), line);
    }
    let unknown: Value = serde_json::from_str(&serde_json::to_string(&got[3]).unwrap()).unwrap();
    assert_eq!(unknown, serde_json::from_str::<Value>(&lines[3]).unwrap());
    within("close", w.close()).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_rejects_bad_input_and_reports_close() {
    let (server, url) = start("strict").await;
    let w = JsonlWriter::new(publisher(&url), JsonlWriterOptions::default());
    assert!(matches!(
        w.write_line(Bytes::from_static(b"{\"a\":\n1}")).await,
        Err(JsonlError::Newline)
    ));
    assert!(matches!(
        w.write(&json!([1, 2])).await,
        Err(JsonlError::NotObject(_))
    ));
    assert!(matches!(
        w.write(&Value::Null).await,
        Err(JsonlError::NotObject(_))
    ));
    w.write(&json!({"ok": true})).await.unwrap();
    let clone = w.clone();
    within("close", w.close()).await.unwrap();
    assert!(matches!(
        clone.write(&json!({"late": 1})).await,
        Err(JsonlError::Closed)
    ));
    assert!(clone.close().await.is_ok(), "closing twice is fine");
    assert_eq!(w.stats().lines_acked, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_to_an_unreachable_server_reports_every_lost_line() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/gone");
    let w = JsonlWriter::new(
        Publisher::new(
            &url,
            PublisherOptions {
                retry_delay: Duration::from_millis(10),
                ..Default::default()
            },
        ),
        JsonlWriterOptions::default(),
    );
    for i in 0..10 {
        w.write(&json!({"i": i})).await.unwrap();
    }
    let err = within("close", w.close()).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("is the trickle server running?"), "{msg}");
    let s = w.stats();
    assert_eq!(s.lines_accepted, 10);
    assert_eq!(
        s.lines_lost, 10,
        "every accepted line is accounted for: {s:?}"
    );
    assert_eq!(s.lines_acked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_line_yields_raw_lines_and_counts_only_framing_errors() {
    let (server, url) = start("raw").await;
    let mut p = publisher(&url);
    let max = 64;
    let mut seg = p.next_segment().await.unwrap();
    let pieces: Vec<&[u8]> = vec![
        b"{\"i\":1}\r\n{garbage here\n",
        b"[1]\n{\"i\":\"\xff\xfe\"}\n{\"i\":",
        b"2}\n",
        &[b'{'; 50],
        &[b' '; 50],
        b"}\n{\"i\":3}\n\n  \n{\"i\":4",
    ];
    for piece in pieces {
        seg.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    seg.close().await.unwrap();
    let mut seg = p.next_segment().await.unwrap();
    seg.write(Bytes::from_static(b"{\"i\":5}\n{\"i\":6}"))
        .await
        .unwrap();
    seg.close().await.unwrap();

    let mut r = reader(&url, max);
    let mut got: Vec<Bytes> = Vec::new();
    for _ in 0..7 {
        got.push(within("read", r.next_line()).await.unwrap().unwrap());
    }
    let want: Vec<&[u8]> = vec![
        b"{\"i\":1}",
        b"{garbage here",
        b"[1]",
        b"{\"i\":\"\xff\xfe\"}",
        b"{\"i\":2}",
        b"{\"i\":3}",
        b"{\"i\":5}",
    ];
    assert_eq!(got, want);
    // The unterminated `{"i":6}` is a complete object: delivered, like `next` does.
    let last = within("read", r.next_line()).await.unwrap().unwrap();
    assert_eq!(&last[..], b"{\"i\":6}");
    p.close().await.unwrap();
    assert!(within("end", r.next_line()).await.unwrap().is_none());
    let s = r.stats();
    assert_eq!(s.oversize, 1, "{s:?}");
    assert_eq!(s.partial, 1, "the broken `{{\"i\":4` tail: {s:?}");
    assert_eq!(s.unterminated, 1, "{s:?}");
    assert_eq!(
        (s.not_json, s.not_object, s.not_utf8, s.mismatch),
        (0, 0, 0, 0)
    );
    assert_eq!(s.lines, 8);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_chunk_round_trips_in_order_across_size_rotations() {
    let (server, url) = start("chunks").await;
    let (tx, mut rx) = tokio::sync::watch::channel(0);
    let reading = spawn_numbered_reader(reader(&url, 1 << 20), tx);
    let w = JsonlWriter::new(
        publisher(&url),
        JsonlWriterOptions {
            max_segment_bytes: 4096,
            ..Default::default()
        },
    );
    let total = 3000u64;
    let mut i = 0u64;
    let mut checked = 0u64;
    // Every chunk's lines but its last are counted ones (as events before a loss report).
    let mut counted = 0u64;
    while i < total {
        // The server keeps 5 segments of ~100 lines: stay within ~1 segment of the reader.
        if i >= checked + 100 {
            within("reader keeps up", rx.wait_for(|n| *n + 100 >= i))
                .await
                .unwrap();
            checked = i;
        }
        if i % 7 == 3 {
            // Single lines interleave with chunks, in order.
            w.write(&json!({"i": i})).await.unwrap();
            i += 1;
            continue;
        }
        let n = (i % 13 + 1).min(total - i);
        let mut chunk = Vec::new();
        for k in i..i + n {
            let pad = "y".repeat((k % 40) as usize);
            chunk.extend_from_slice(json!({"i": k, "pad": pad}).to_string().as_bytes());
            chunk.push(b'\n');
        }
        assert_eq!(
            w.write_chunk_counted(Bytes::from(chunk), n - 1)
                .await
                .unwrap(),
            n
        );
        counted += n - 1;
        i += n;
    }
    within("flush", w.flush()).await.unwrap();
    if tokio::time::timeout(LIMIT, rx.wait_for(|n| *n == total))
        .await
        .is_err()
    {
        panic!(
            "reader at {} of {total}; writer {:?}",
            *rx.borrow(),
            w.stats()
        );
    }
    within("close", w.close()).await.unwrap();
    let (got, r) = within("reader end", reading).await.unwrap();
    assert_in_order(&got, total);
    let ws = w.stats();
    assert_eq!(
        (
            ws.lines_accepted,
            ws.lines_written,
            ws.lines_acked,
            ws.lines_lost
        ),
        (total, total, total, 0)
    );
    assert_eq!(
        (ws.counted_accepted, ws.counted_acked, ws.counted_lost),
        (counted, counted, 0),
        "counted lines followed their chunks across rotations: {ws:?}"
    );
    assert!(ws.rotations_by_size >= 10, "{ws:?}");
    let rs = r.stats();
    assert_eq!((rs.lines, rs.bad_lines()), (total, 0));
    assert!(rs.subscriber.bytes <= ws.segments * 4096, "{rs:?} {ws:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_chunk_rejects_chunks_that_would_break_framing() {
    let (server, url) = start("strict-chunks").await;
    let w = JsonlWriter::new(publisher(&url), JsonlWriterOptions::default());
    for (bad, what) in [
        (&b""[..], "empty"),
        (b"{\"a\":1}", "no final newline"),
        (b"{\"a\":1}\n\n{\"b\":2}\n", "an empty line"),
        (b"\n{\"a\":1}\n", "a leading empty line"),
    ] {
        let err = w.write_chunk(Bytes::from_static(bad)).await.unwrap_err();
        assert!(
            matches!(err, JsonlError::Empty | JsonlError::Unterminated),
            "{what}: {err:?}"
        );
    }
    assert_eq!(
        w.write_chunk(Bytes::from_static(b"{\"a\":1}\n{\"b\":2}\n"))
            .await
            .unwrap(),
        2
    );
    within("close", w.close()).await.unwrap();
    assert_eq!(w.stats().lines_acked, 2);
    assert!(matches!(
        w.write_chunk(Bytes::from_static(b"{}\n")).await,
        Err(JsonlError::Closed)
    ));
    server.shutdown().await;
}

fn compact(s: &str) -> String {
    let mut out = Vec::new();
    trickle::jsonl::compact_json(s, &mut out);
    String::from_utf8(out).expect("compact_json keeps UTF-8")
}

#[test]
fn compact_json_keeps_strings_and_order() {
    assert_eq!(
        compact(r#"{ "b" : 1 ,  "a":[ 1, 2 ] }"#),
        r#"{"b":1,"a":[1,2]}"#
    );
    assert_eq!(
        compact(r#"{"s":"a b \" c\\","t" : "\\"}"#),
        r#"{"s":"a b \" c\\","t":"\\"}"#
    );
    assert_eq!(compact(r#"{"n":1.50e3}"#), r#"{"n":1.50e3}"#);
}
