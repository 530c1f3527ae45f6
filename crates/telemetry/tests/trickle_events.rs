//! TrickleEventsSink: order and byte fidelity, overload with loss reports, failed writes.

use bytes::Bytes;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::output::LineCollector;
use telemetry::sinks::{SessionContext, TrickleEventsConfig, TrickleEventsSink};
use telemetry::{Envelope, Event, Fields, LineOutput, OutputError, RawEnvelope, Sink};
use tokio::runtime::Handle;

fn session() -> SessionContext {
    SessionContext {
        session_id: Some("sess-9".into()),
        connection_id: Some("conn-9".into()),
    }
}

fn parse(line: &Bytes) -> Value {
    serde_json::from_slice(line).expect("line is JSON")
}

/// The `seq` and envelope bytes of an event line, `{"type":"telemetry","seq":N,"event":...}`.
fn event_bytes(line: &Bytes) -> (u64, &[u8]) {
    let prefix = br#"{"type":"telemetry","seq":"#;
    let text = String::from_utf8_lossy(line);
    assert!(line.starts_with(prefix), "{text}");
    let digits = line[prefix.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let seq: u64 = std::str::from_utf8(&line[prefix.len()..prefix.len() + digits])
        .unwrap()
        .parse()
        .unwrap();
    let rest = &line[prefix.len() + digits..];
    assert!(rest.starts_with(br#","event":"#), "{text}");
    assert!(line.ends_with(b"}"));
    (seq, &rest[9..rest.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_events_in_n_lines_out_in_order_with_ids_intact() {
    let out = LineCollector::new();
    let sink = TrickleEventsSink::spawn(out.clone(), session(), 8192).unwrap();
    const N: usize = 5000;
    let mut expected = Vec::with_capacity(N);
    for i in 0..N {
        let env = Envelope::new(
            if i % 7 == 0 {
                "stream_started"
            } else {
                "stream_heartbeat"
            },
            Fields::new().session_id("sess-9").meta("i", i),
        );
        expected.push(env.to_json());
        sink.emit(Event::from(env));
    }
    // A forwarded envelope goes out byte for byte, odd spacing and all.
    let raw =
        Bytes::from_static(b"{ \"id\": \"fwd-1\", \"data\": {\"type\": \"pong\", \"x\": 1.50} }");
    sink.emit(Event::Raw(RawEnvelope::parse(raw.clone()).unwrap()));
    expected.push(raw);
    let stats = sink.shutdown().await;
    let lines = out.lines();
    assert_eq!(lines.len(), N + 1);
    for (i, (line, want)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(
            event_bytes(line),
            (i as u64 + 1, want.as_ref()),
            "numbered from 1, no hole"
        );
        assert_eq!(parse(line)["type"], "telemetry");
    }
    assert_eq!(sink.transit().last_seq, N as u64 + 1);
    assert_eq!(
        (
            stats.emitted,
            stats.delivered,
            stats.dropped(),
            stats.queued,
            stats.reports
        ),
        (N as u64 + 1, N as u64 + 1, 0, 0, 0)
    );
}

/// An output that takes its time, so a burst overflows the queue.
struct Slow {
    inner: LineCollector,
    delay: Duration,
}

impl LineOutput for Slow {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        tokio::time::sleep(self.delay).await;
        self.inner.write_lines(lines).await
    }
}

/// Event lines are numbered 1, 2, ... without a hole; reports are not numbered, count
/// `report_seq` 1, 2, ..., and each covers the event lines since the one before it
/// (`seq_from`..=`seq_to`). Returns the last event `seq`.
fn check_numbering(lines: &[Bytes]) -> u64 {
    let (mut last_seq, mut report_seq, mut next_from) = (0u64, 0u64, 1u64);
    for line in lines {
        let v = parse(line);
        if v["event"]["data"]["type"] == "telemetry_dropped" {
            assert!(v.get("seq").is_none(), "reports are not numbered: {v}");
            let d = &v["event"]["data"];
            report_seq += 1;
            assert_eq!(d["report_seq"].as_u64(), Some(report_seq), "{v}");
            assert_eq!(d["seq_from"].as_u64(), Some(next_from), "{v}");
            assert_eq!(d["seq_to"].as_u64(), Some(last_seq), "{v}");
            next_from = last_seq + 1;
        } else {
            let (seq, _) = event_bytes(line);
            assert_eq!(seq, last_seq + 1, "numbered without a hole");
            last_seq = seq;
        }
    }
    last_seq
}

fn reports(lines: &[Bytes]) -> Vec<Value> {
    lines
        .iter()
        .map(parse)
        .filter(|v| v["event"]["data"]["type"] == "telemetry_dropped")
        .map(|v| v["event"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_keeps_every_lifecycle_event_and_reports_exact_losses() {
    let out = LineCollector::new();
    let config = TrickleEventsConfig {
        capacity: 256,
        report_interval: Duration::from_millis(20),
        ..TrickleEventsConfig::default()
    };
    let sink = TrickleEventsSink::spawn_on(
        &Handle::current(),
        Slow {
            inner: out.clone(),
            delay: Duration::from_millis(2),
        },
        session(),
        config,
    );
    const HEARTBEATS: usize = 20_000;
    const LIFECYCLE: usize = 100;
    let producers: Vec<_> = (0..2)
        .map(|t| {
            let sink = Arc::clone(&sink);
            std::thread::spawn(move || {
                for i in 0..HEARTBEATS / 2 {
                    sink.emit(Event::from(Envelope::new(
                        "stream_heartbeat",
                        Fields::new().meta("t", t).meta("i", i),
                    )));
                    if i % (HEARTBEATS / LIFECYCLE) == 0 {
                        sink.emit(Event::from(Envelope::new(
                            "pipeline_loaded",
                            Fields::new().meta("t", t).meta("i", i),
                        )));
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let stats = sink.shutdown().await;
    let lines = out.lines();

    assert_eq!(stats.emitted, (HEARTBEATS + LIFECYCLE) as u64);
    assert!(stats.dropped_low > 0, "the burst must overflow: {stats:?}");
    assert_eq!(
        stats.dropped_high, 0,
        "High is never dropped while Low is queued"
    );
    assert_eq!(stats.emitted, stats.delivered + stats.dropped());
    assert_eq!(stats.queued, 0);

    let values: Vec<Value> = lines.iter().map(parse).collect();
    let lifecycle = values
        .iter()
        .filter(|v| v["event"]["data"]["type"] == "pipeline_loaded")
        .count();
    assert_eq!(lifecycle, LIFECYCLE, "every lifecycle event arrives");

    let reports = reports(&lines);
    assert_eq!(reports.len() as u64, stats.reports);
    assert_eq!(lines.len() as u64, stats.delivered + stats.reports);
    assert_eq!(check_numbering(&lines), stats.delivered);
    assert_eq!(
        sink.transit(),
        telemetry::sinks::TransitTotals {
            last_seq: stats.delivered,
            reports: stats.reports,
            dropped_total: stats.dropped(),
            lost_downstream: 0,
        }
    );
    let sum: u64 = reports
        .iter()
        .map(|r| r["data"]["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, stats.dropped(), "reported losses equal counted losses");
    let sum_low: u64 = reports
        .iter()
        .map(|r| r["data"]["dropped_low"].as_u64().unwrap())
        .sum();
    assert_eq!(sum_low, stats.dropped_low);
    let last = reports.last().unwrap();
    assert_eq!(
        last["data"]["dropped_total"].as_u64().unwrap(),
        stats.dropped()
    );
    let mut prev_end = 0;
    for r in &reports {
        let d = &r["data"];
        assert_eq!(d["session_id"], "sess-9");
        assert_eq!(d["connection_id"], "conn-9");
        assert_eq!(d["sink"], "trickle_events");
        let (start, end) = (
            d["window_start_ms"].as_u64().unwrap(),
            d["window_end_ms"].as_u64().unwrap(),
        );
        assert!(
            start <= end && start >= prev_end,
            "windows are ordered and disjoint"
        );
        prev_end = end;
        assert_eq!(
            d["dropped"].as_u64().unwrap(),
            d["dropped_high"].as_u64().unwrap() + d["dropped_low"].as_u64().unwrap()
        );
    }
}

/// Fails the first `fail` batches that carry any line, then works.
struct Flaky {
    inner: LineCollector,
    fail: Arc<AtomicUsize>,
}

impl LineOutput for Flaky {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        if self
            .fail
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            // Write the first line only, then fail: a partial batch.
            let first: Vec<Bytes> = lines.into_iter().take(1).collect();
            let written = first.len();
            self.inner.write_lines(first).await?;
            return Err(OutputError {
                written,
                reason: "channel reset".into(),
            });
        }
        self.inner.write_lines(lines).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_are_counted_and_reported_downstream() {
    let out = LineCollector::new();
    let sink = TrickleEventsSink::spawn_on(
        &Handle::current(),
        Flaky {
            inner: out.clone(),
            fail: Arc::new(AtomicUsize::new(3)),
        },
        session(),
        TrickleEventsConfig {
            capacity: 10_000,
            report_interval: Duration::from_millis(1),
            poll_interval: Duration::from_millis(1),
            max_poll_interval: Some(Duration::from_millis(8)),
            ..TrickleEventsConfig::default()
        },
    );
    for round in 0..6 {
        for i in 0..50 {
            sink.emit(Event::from(Envelope::new(
                "stream_started",
                Fields::new().meta("round", round).meta("i", i),
            )));
        }
        // Let the drain take each round as its own batch.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = sink.shutdown().await;
    assert!(stats.write_errors >= 1, "{stats:?}");
    assert!(stats.dropped_high > 0, "{stats:?}");
    assert_eq!(stats.emitted, 300);
    assert_eq!(stats.emitted, stats.delivered + stats.dropped());
    let lines = out.lines();
    let reports = reports(&lines);
    let sum: u64 = reports
        .iter()
        .map(|r| r["data"]["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, stats.dropped());
    assert_eq!(
        lines.len() as u64,
        stats.delivered + stats.reports,
        "every line written is a delivered event or a report"
    );
    // The numbers of lines the writer refused are used again: no hole for a reader to see.
    assert_eq!(check_numbering(&lines), stats.delivered);
}

/// A sink with flow control over segments of `segment` bytes, holding while closing for
/// `close_wait`.
fn flow_sink(
    out: &LineCollector,
    segment: usize,
    capacity: usize,
    close_wait: Duration,
) -> Arc<TrickleEventsSink> {
    TrickleEventsSink::spawn_on(
        &Handle::current(),
        out.clone(),
        session(),
        TrickleEventsConfig {
            capacity,
            flow_segment_bytes: Some(segment),
            flow_close_wait: close_wait,
            ..TrickleEventsConfig::default()
        },
    )
}

/// Heartbeat `i`, padded to a ~300-byte line.
fn padded_heartbeat(i: usize) -> Event {
    Event::from(Envelope::new(
        "stream_heartbeat",
        Fields::new().meta("i", i).meta("pad", "x".repeat(200)),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_holds_the_drain_to_the_minimum_budget_heartbeats_shed_first() {
    const SEGMENT: usize = 64 << 10;
    let out = LineCollector::new();
    let sink = flow_sink(&out, SEGMENT, 256, Duration::from_secs(10));
    // The client has read nothing yet, and then stops reading (stopped, starved...).
    sink.client_read(0);
    let started = std::time::Instant::now();
    let mut lifecycle = 0;
    for i in 0..20_000usize {
        sink.emit(padded_heartbeat(i));
        if i % 400 == 0 {
            lifecycle += 1;
            sink.emit(Event::from(Envelope::new(
                "pipeline_loaded",
                Fields::new().meta("i", i),
            )));
        }
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let stalled_for = started.elapsed().as_secs_f64();
    let budget = sink.budget();
    assert!(
        budget == Some(telemetry::flow::MIN_BUDGET) || budget == Some(0.0),
        "held: {budget:?}"
    );
    // At most the credit (2.5 segments, ~540 lines here) freely, then nothing for 500 ms, then
    // the minimum budget (plus its 50 ms of burst per refill) up to 2.9 segments: nowhere near
    // the 5-segment window.
    let events: Vec<usize> = out
        .lines()
        .iter()
        .filter(|l| l.starts_with(br#"{"type":"telemetry","seq":"#))
        .map(|l| l.len() + 1)
        .collect();
    let bytes = events.iter().sum::<usize>() as f64;
    let line = bytes / events.len() as f64;
    let credit = telemetry::flow::WINDOW_SEGMENTS * SEGMENT as f64;
    let trickle = telemetry::flow::MIN_BUDGET
        * (stalled_for - telemetry::flow::SILENT.as_secs_f64()).max(0.0)
        + 10.0;
    let bound = (credit + (trickle + 1.0) * line)
        .min(telemetry::flow::TRICKLE_SEGMENTS * SEGMENT as f64 + line);
    assert!(
        bytes <= bound,
        "{} event lines ({bytes:.0} bytes) written to a stalled client in {stalled_for:.2} s \
         (bound: the credit of {credit:.0} bytes and a trickle of {trickle:.0} lines, at most 2.9 \
         segments: {bound:.0})",
        events.len()
    );
    // It catches up: no more limit.
    sink.client_read(sink.transit().last_seq);
    let stats = sink.shutdown().await;
    assert_eq!(stats.emitted, 20_000 + lifecycle);
    assert_eq!(stats.emitted, stats.delivered + stats.dropped());
    assert_eq!(stats.dropped_high, 0, "{stats:?}");
    assert!(stats.dropped_low > 15_000, "heartbeats shed: {stats:?}");
    let lines = out.lines();
    let got_lifecycle = lines
        .iter()
        .map(parse)
        .filter(|v| v["event"]["data"]["type"] == "pipeline_loaded")
        .count() as u64;
    assert_eq!(got_lifecycle, lifecycle, "every lifecycle event goes out");
    check_numbering(&lines);
    assert_eq!(sink.budget(), None);
}

/// Bytes of the numbered event lines in `out` (newlines included).
fn numbered_bytes(out: &LineCollector) -> usize {
    out.lines()
        .iter()
        .filter(|l| l.starts_with(br#"{"type":"telemetry","seq":"#))
        .map(|l| l.len() + 1)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_with_a_deep_queue_writes_it_as_the_client_reads_never_past_the_credit() {
    const SEGMENT: usize = 64 << 10;
    let out = LineCollector::new();
    let sink = flow_sink(&out, SEGMENT, 10_000, Duration::from_secs(60));
    let credit = telemetry::flow::WINDOW_SEGMENTS * SEGMENT as f64;
    sink.client_read(0);
    // ~1.5 MB queued (23 segments), then the runner stops: before this change the closing drain
    // wrote the whole queue at once, far past the client's window.
    for i in 0..5_000usize {
        sink.emit(padded_heartbeat(i));
    }
    sink.close();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.budget() != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "never held: {:?}",
            sink.stats()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let line = numbered_bytes(&out) as f64 / sink.transit().last_seq as f64;
    assert!(
        numbered_bytes(&out) as f64 <= credit + line,
        "closing wrote {} bytes to a client that read nothing (credit {credit})",
        numbered_bytes(&out)
    );
    // The client reads on; every report brings credit back, and the queue goes out whole.
    let closing = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.shutdown().await })
    };
    let mut read_bytes = 0usize;
    while !closing.is_finished() {
        assert!(std::time::Instant::now() < deadline, "{:?}", sink.stats());
        let written = numbered_bytes(&out);
        assert!(
            (written - read_bytes) as f64 <= credit + line,
            "{} bytes past the client's position (credit {credit})",
            written - read_bytes
        );
        // The client reads every line written so far (its position: those lines' bytes).
        let last = sink.transit().last_seq;
        sink.client_read(last);
        read_bytes = out
            .lines()
            .iter()
            .filter(|l| l.starts_with(br#"{"type":"telemetry","seq":"#))
            .take(last as usize)
            .map(|l| l.len() + 1)
            .sum();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stats = closing.await.unwrap();
    assert_eq!(
        (stats.emitted, stats.delivered, stats.dropped()),
        (5_000, 5_000, 0),
        "{stats:?}"
    );
    assert_eq!(check_numbering(&out.lines()), 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_flow_writes_what_is_queued_at_once() {
    let out = LineCollector::new();
    let sink = flow_sink(&out, 64 << 10, 10_000, Duration::from_secs(600));
    sink.client_read(0);
    for i in 0..3_000usize {
        sink.emit(padded_heartbeat(i));
    }
    // The client is gone (its control channel ended): nobody will report, nothing to wait for.
    sink.release_flow();
    let stats = tokio::time::timeout(Duration::from_secs(20), sink.shutdown())
        .await
        .expect("released: the queue goes out without waiting for reports");
    assert_eq!((stats.delivered, stats.dropped()), (3_000, 0), "{stats:?}");
}

#[tokio::test]
async fn emits_after_shutdown_are_counted_as_dropped() {
    let out = LineCollector::new();
    let sink = TrickleEventsSink::spawn(out.clone(), session(), 16).unwrap();
    sink.emit(Event::from(Envelope::new("session_created", Fields::new())));
    let before = sink.shutdown().await;
    assert_eq!(before.delivered, 1);
    sink.emit(Event::from(Envelope::new("session_closed", Fields::new())));
    sink.emit(Event::from(Envelope::new(
        "stream_heartbeat",
        Fields::new(),
    )));
    let after = sink.stats();
    assert_eq!(
        (after.emitted, after.dropped_high, after.dropped_low),
        (3, 1, 1)
    );
    assert_eq!(out.len(), 1);
    // Shutdown twice is harmless.
    sink.shutdown().await;
}

#[test]
fn spawn_outside_a_runtime_is_an_error_not_a_panic() {
    let err = TrickleEventsSink::spawn(LineCollector::new(), session(), 16).unwrap_err();
    assert!(err.to_string().contains("Tokio runtime"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_event_is_written_at_once_not_after_a_poll_interval() {
    let out = LineCollector::new();
    let sink = TrickleEventsSink::spawn_on(
        &Handle::current(),
        out.clone(),
        session(),
        TrickleEventsConfig {
            // A poll far longer than the test: only the idle -> busy wake-up can deliver in time.
            poll_interval: Duration::from_secs(3600),
            ..TrickleEventsConfig::default()
        },
    );
    for i in 0..3usize {
        // Let the drain park between events.
        tokio::time::sleep(Duration::from_millis(20)).await;
        sink.emit(Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        )));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.len() <= i && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(
            out.len(),
            i + 1,
            "event {i} written without waiting for the poll"
        );
    }
    let stats = sink.shutdown().await;
    assert_eq!((stats.delivered, stats.dropped()), (3, 0));
}

/// An output whose "later" losses the test decides (a segment that fails after its lines were
/// taken, as the events writer's do).
struct Lossy {
    inner: LineCollector,
    lost: Arc<std::sync::atomic::AtomicU64>,
}

impl LineOutput for Lossy {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        self.inner.write_lines(lines).await
    }

    fn lines_lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_the_output_loses_later_are_reported_as_telemetry_dropped_once() {
    let out = LineCollector::new();
    let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let config = TrickleEventsConfig {
        report_interval: Duration::from_millis(10),
        max_poll_interval: Some(Duration::from_millis(20)),
        ..TrickleEventsConfig::default()
    };
    let sink = TrickleEventsSink::spawn_on(
        &Handle::current(),
        Lossy {
            inner: out.clone(),
            lost: lost.clone(),
        },
        session(),
        config,
    );
    let reported = |out: &LineCollector| -> u64 {
        reports(&out.lines())
            .iter()
            .map(|r| r["data"]["dropped"].as_u64().unwrap())
            .sum()
    };
    let wait_for = |want: u64| {
        let out = out.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while reported(&out) < want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "reported {} of {want}: {:?}",
                    reported(&out),
                    out.lines()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for i in 0..6 {
        sink.emit(Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        )));
    }
    // The output takes all six (delivered); only then can it lose some.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink.stats().delivered < 6 {
        assert!(std::time::Instant::now() < deadline, "{:?}", sink.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Two of the lines the output took are lost later: an idle drain notices at its next poll.
    lost.store(2, Ordering::Relaxed);
    wait_for(2).await;
    lost.store(5, Ordering::Relaxed);
    wait_for(5).await;
    let stats = sink.shutdown().await;
    assert_eq!(reported(&out), 5, "each lost line reported once");
    assert_eq!(stats.dropped(), 5, "{stats:?}");
    assert_eq!(
        stats.delivered, 1,
        "taken by the output, less those it lost: {stats:?}"
    );
}

/// Counts the drain's wake-ups: it asks its output for lost lines once per wake-up.
struct Counting {
    inner: LineCollector,
    wakeups: Arc<AtomicUsize>,
}

impl LineOutput for Counting {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        self.inner.write_lines(lines).await
    }

    fn lines_lost(&self) -> u64 {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_drain_polls_only_every_max_poll_yet_writes_a_lone_event_at_once() {
    let out = LineCollector::new();
    let wakeups = Arc::new(AtomicUsize::new(0));
    let config = TrickleEventsConfig {
        poll_interval: Duration::from_millis(1),
        max_poll_interval: Some(Duration::from_millis(300)),
        ..TrickleEventsConfig::default()
    };
    let sink = TrickleEventsSink::spawn_on(
        &Handle::current(),
        Counting {
            inner: out.clone(),
            wakeups: wakeups.clone(),
        },
        session(),
        config,
    );
    let lone = |i: u64| {
        Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        ))
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // One event, then an idle second: the event's wake-up, two short polls after it, then one
    // every 300 ms. A drain backing off by doubling from 1 ms wakes about 11 times, a fixed 1 ms
    // poll 1,000 times.
    let before = wakeups.load(Ordering::Relaxed);
    sink.emit(lone(0));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(out.lines().len(), 1);
    let idle_wakeups = wakeups.load(Ordering::Relaxed) - before;
    assert!(
        idle_wakeups <= 7,
        "{idle_wakeups} wake-ups in an idle second"
    );
    // The next lone event wakes the idle drain at once, not at its next poll.
    let start = std::time::Instant::now();
    sink.emit(lone(1));
    while out.lines().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the event was never written"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "written {:?} after the emit: it waited for a poll",
        start.elapsed()
    );
    sink.shutdown().await;
}
