//! The process-wide sink: install, guard, no-op without a sink, opt-out.
//! Tests here share process globals, so each takes `LOCK` first.

use bytes::Bytes;
use std::sync::Arc;
use telemetry::sinks::MemorySink;
use telemetry::{
    install_sink, installed_sink, publish_event, publish_raw_event, set_telemetry_enabled, Event,
    Fields, RawEnvelope,
};

static LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

#[test]
fn publish_without_a_sink_is_a_no_op() {
    let _l = LOCK.lock();
    set_telemetry_enabled(true);
    assert!(installed_sink().is_none());
    publish_event("stream_started", Fields::new().session_id("s"));
}

#[test]
fn installed_sink_receives_events_until_its_guard_drops() {
    let _l = LOCK.lock();
    set_telemetry_enabled(true);
    let sink = Arc::new(MemorySink::new());
    let guard = install_sink(sink.clone());
    assert_eq!(guard.sink().name(), "memory");
    publish_event("stream_started", Fields::new().session_id("s1"));
    publish_raw_event(
        RawEnvelope::parse(Bytes::from_static(br#"{"id":"r1","data":{"type":"x"}}"#)).unwrap(),
    );
    drop(guard);
    assert!(installed_sink().is_none());
    publish_event("stream_stopped", Fields::new());
    let events = sink.take();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].event_type(), Some("stream_started"));
    assert_eq!(events[0].session_id(), Some("s1"));
    assert!(matches!(&events[1], Event::Raw(r) if r.id() == "r1"));
}

#[test]
fn an_old_guard_does_not_uninstall_a_newer_sink() {
    let _l = LOCK.lock();
    set_telemetry_enabled(true);
    let first = Arc::new(MemorySink::new());
    let second = Arc::new(MemorySink::new());
    let g1 = install_sink(first.clone());
    let g2 = install_sink(second.clone());
    drop(g1);
    publish_event("stream_started", Fields::new());
    assert_eq!(first.len(), 0);
    assert_eq!(second.len(), 1);
    drop(g2);
    assert!(installed_sink().is_none());
}

#[test]
fn opting_out_turns_publishing_off() {
    let _l = LOCK.lock();
    let sink = Arc::new(MemorySink::new());
    let _g = install_sink(sink.clone());
    set_telemetry_enabled(false);
    assert!(!telemetry::telemetry_enabled());
    publish_event("stream_started", Fields::new());
    publish_raw_event(RawEnvelope::parse(Bytes::from_static(br#"{"id":"r"}"#)).unwrap());
    assert_eq!(sink.len(), 0);
    set_telemetry_enabled(true);
    publish_event("stream_started", Fields::new());
    assert_eq!(sink.len(), 1);
}

#[test]
fn publishing_from_four_threads_reaches_the_sink_once_each() {
    let _l = LOCK.lock();
    set_telemetry_enabled(true);
    let sink = Arc::new(MemorySink::new());
    let _g = install_sink(sink.clone());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    publish_event("stream_heartbeat", Fields::new().meta("t", t).meta("i", i));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let events = sink.take();
    assert_eq!(events.len(), 8_000);
    let mut ids: Vec<String> = events.iter().map(|e| e.id().into_owned()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8_000, "every envelope has its own id");
}
