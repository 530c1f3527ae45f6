//! LogSink's line, FileSink's byte-for-byte output, MemorySink.

use bytes::Bytes;
use std::io::Write;
use std::sync::Arc;
use telemetry::sinks::{FileSink, LogSink, MemorySink};
use telemetry::{Envelope, Event, Fields, RawEnvelope, Sink};

#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn log_sink_logs_the_exact_line_through_tracing() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(true)
        .finish();
    let sink = LogSink::new();
    let id = uuid::Uuid::new_v4();
    let built = Envelope::with_stamp(
        id,
        1,
        "stream_started",
        Fields::new().session_id("sess").connection_id("conn"),
    );
    let mut raw = RawEnvelope::parse(Bytes::from_static(
        br#"{"id":"raw-1","type":"stream_trace","data":{"type":"error","session_id":"s2"}}"#,
    ))
    .unwrap();
    raw.annotate_relay("trickle", 1);
    let bare = RawEnvelope::parse(Bytes::from_static(br#"{"id":"raw-2"}"#)).unwrap();
    tracing::subscriber::with_default(subscriber, || {
        sink.emit(Event::from(built));
        sink.emit(Event::Raw(raw));
        sink.emit(Event::Raw(bare));
    });
    let text = String::from_utf8(captured.0.lock().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            format!("telemetry: TELEMETRY type=stream_started id={id} session=sess connection=conn relayed_via=-"),
            "telemetry: TELEMETRY type=error id=raw-1 session=s2 connection=- relayed_via=trickle".to_string(),
            "telemetry: TELEMETRY type=- id=raw-2 session=- connection=- relayed_via=-".to_string(),
        ]
    );
    let s = sink.stats();
    assert_eq!((s.emitted, s.delivered, s.dropped()), (3, 3, 0));
    assert_eq!(sink.name(), "log");
}

#[test]
fn file_sink_appends_exact_bytes_one_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.jsonl");
    let sink = FileSink::create(&path).unwrap();
    let originals: Vec<Bytes> = vec![
        Bytes::from_static(b"{ \"id\" : \"a\",  \"data\":{\"type\":\"x\", \"v\": 1.50}}"),
        Bytes::from_static(
            "{\"id\":\"b\",\"data\":{\"type\":\"stream_heartbeat\",\"s\":\"\\u00e9\u{e9}\"}}"
                .as_bytes(),
        ),
    ];
    for b in &originals {
        sink.emit(Event::Raw(RawEnvelope::parse(b.clone()).unwrap()));
    }
    let built = Envelope::new("session_created", Fields::new().session_id("s"));
    let built_json = built.to_json();
    sink.emit(Event::from(built));
    sink.flush().unwrap();
    let mut want = Vec::new();
    for b in originals.iter().chain([&built_json]) {
        want.extend_from_slice(b);
        want.push(b'\n');
    }
    assert_eq!(std::fs::read(&path).unwrap(), want);
    let s = sink.stats();
    assert_eq!(
        (s.emitted, s.delivered, s.dropped(), s.queued),
        (3, 3, 0, 0)
    );

    // More events, then close by drop: they are on disk afterwards, appended.
    for i in 0..1000 {
        sink.emit(Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        )));
    }
    drop(sink);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1003);
    for (i, line) in text.lines().skip(3).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["data"]["i"], i);
    }
}

#[test]
fn file_sink_counts_drops_when_overrun_and_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.jsonl");
    let sink = FileSink::with_capacity(&path, 4).unwrap();
    for i in 0..20_000 {
        sink.emit(Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        )));
    }
    sink.flush().unwrap();
    let s = sink.stats();
    assert_eq!(s.emitted, 20_000);
    assert_eq!(s.emitted, s.delivered + s.dropped() + s.queued);
    let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
    assert_eq!(lines, s.delivered);
    sink.close();
    sink.emit(Event::from(Envelope::new("session_closed", Fields::new())));
    let after = sink.stats();
    assert_eq!(after.dropped_high, s.dropped_high + 1);
    sink.flush().unwrap();
}

#[test]
fn file_sink_reports_an_unopenable_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = FileSink::create(dir.path().join("missing/dir/x.jsonl")).unwrap_err();
    assert!(err.to_string().contains("cannot open"), "{err}");
}

#[test]
fn memory_sink_keeps_events_in_order() {
    let sink = MemorySink::new();
    for i in 0..10 {
        sink.emit(Event::from(Envelope::new(
            "stream_heartbeat",
            Fields::new().meta("i", i),
        )));
    }
    let events = sink.take();
    assert_eq!(events.len(), 10);
    assert!(sink.is_empty());
    assert_eq!(sink.stats().emitted, 10);
}
