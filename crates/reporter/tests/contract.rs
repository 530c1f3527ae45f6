//! The response contract of the metrics API, one test per row, against a real scripted HTTP
//! server on loopback; plus the disk buffer, the memory fallback, the caps and gzip.

mod common;

use common::*;
use reporter::{FlushOutcome, GzipMode, Reporter, ReporterConfig, ReporterStats};
use serde_json::Value;
use spool::SpoolOptions;
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};
use telemetry::{Event, RawEnvelope, Sink};

const WAIT: Duration = Duration::from_secs(15);

/// Fast timings for tests: 30 ms flush interval, 50 ms backoff base.
fn config(url: &str, dir: Option<&Path>) -> ReporterConfig {
    ReporterConfig::new(url, "key-1")
        .with_buffer_path(dir.map(Path::to_path_buf))
        .with_flush_interval(Duration::from_millis(30))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(400))
        .with_default_retry_after(Duration::from_millis(700))
        .with_request_timeout(Duration::from_secs(5))
        .with_report_interval(Duration::from_millis(50))
        .with_disk_retry(Duration::from_millis(100))
        .with_host("test-host")
}

fn emit_n(r: &Reporter, from: u64, n: u64) -> Vec<String> {
    (from..from + n)
        .map(|i| {
            let e = event("stream_heartbeat", i);
            let id = e.id().into_owned();
            r.emit(e);
            id
        })
        .collect()
}

/// Every event is accounted for exactly once.
fn assert_conserved(s: &ReporterStats) {
    assert_eq!(
        s.emitted + s.reports + s.recovered,
        s.acked + s.dropped() + s.buffered + s.handoff_pending,
        "conservation: {s:?}"
    );
}

fn settle(r: &Reporter, what: &str, cond: impl Fn(&ReporterStats) -> bool) -> ReporterStats {
    wait_until(what, WAIT, || cond(&r.reporter_stats()));
    r.reporter_stats()
}

#[test]
fn contract_200_forgets_the_batch() {
    let srv = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    let r = Reporter::start(config(&srv.url(), Some(dir.path()))).unwrap();
    let ids = emit_n(&r, 0, 10);
    let s = settle(&r, "10 acked", |s| s.acked == 10);
    assert_eq!(s.buffered, 0);
    assert_eq!(s.dropped(), 0);
    assert_conserved(&s);
    assert_eq!(srv.accepted_ids(), ids, "every event once, in order");
    assert_eq!(
        s.status_2xx,
        srv.received().len() as u64,
        "each 2xx answer counted: {s:?}"
    );
    let req = &srv.received()[0];
    assert_eq!(req.auth.as_deref(), Some("Bearer key-1"));
    assert_eq!(req.body["app"], "scope");
    assert_eq!(req.body["host"], "test-host");
    let ev = &req.events()[0];
    assert_eq!(ev["type"], "stream_heartbeat");
    assert_eq!(ev["data"]["type"], "stream_heartbeat");
    assert_eq!(ev["data"]["session_id"], "sess");
    assert_eq!(ev["timestamp"], ev["data"]["timestamp"]);
    r.shutdown(Duration::from_secs(2));
    drop(r);
    // Nothing is left on disk: a new start re-sends nothing.
    let (spool, _) = spool::Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(spool.len(), 0);
}

#[test]
fn contract_400_drops_the_batch_and_logs_it() {
    let logs = capture_logs();
    let srv = FaultServer::start();
    srv.script([Reply::status(400)]);
    let r = Reporter::start(config(&srv.url(), None)).unwrap();
    let ids = emit_n(&r, 0, 5);
    let s = settle(&r, "all resolved", |s| {
        s.acked + s.dropped_400 == 5 && s.buffered == 0
    });
    let got = srv.received();
    let dropped = got[0].ids();
    assert_eq!(got[0].status, 400);
    assert_eq!(s.dropped_400, dropped.len() as u64);
    assert_eq!(s.status_400, 1, "the one 400 answer counted: {s:?}");
    assert_conserved(&s);
    // The dropped batch is never re-sent; the rest arrives once.
    let accepted = srv.accepted_ids();
    assert!(accepted.iter().all(|i| !dropped.contains(i)));
    assert_eq!([dropped, accepted].concat(), ids);
    assert!(logs_contain(&logs, "rejected the batch as malformed (400)"));
}

#[test]
fn contract_401_keeps_and_pauses_until_the_key_changes() {
    let srv = FaultServer::start();
    srv.rule(|r| (r.auth.as_deref() != Some("Bearer good")).then(|| Reply::status(401)));
    let dir = tempfile::tempdir().unwrap();
    let r = Reporter::start(ReporterConfig {
        api_key: "bad".into(),
        ..config(&srv.url(), Some(dir.path()))
    })
    .unwrap();
    let mut ids = emit_n(&r, 0, 3);
    settle(&r, "paused", |s| s.paused);
    // Paused: more events, several flush intervals and backoffs, and still no new request.
    ids.extend(emit_n(&r, 3, 2));
    std::thread::sleep(Duration::from_millis(600));
    let s = r.reporter_stats();
    assert_eq!(srv.requests(), 1, "no request while paused");
    assert_eq!((s.status_401, s.buffered, s.acked), (1, 5, 0), "{s:?}");
    assert_eq!(
        r.flush_timeout(Duration::from_secs(1)),
        FlushOutcome::Paused { left: 5 }
    );
    r.set_api_key("good");
    let s = settle(&r, "all acked after the key change", |s| s.acked == 5);
    assert!(!s.paused);
    assert_conserved(&s);
    assert_eq!(srv.accepted_ids(), ids);
    assert!(srv.received()[1..]
        .iter()
        .all(|q| q.auth.as_deref() == Some("Bearer good")));
}

#[test]
fn contract_413_splits_and_drops_a_lone_oversized_event() {
    let srv = FaultServer::start();
    // More than 2 events, or the "big" event: too large.
    srv.rule(|r| {
        let big = r
            .events()
            .iter()
            .any(|e| e["data"]["big"] == Value::Bool(true));
        (r.events().len() > 2 || big).then(|| Reply::status(413))
    });
    let dir = tempfile::tempdir().unwrap();
    let r = Reporter::start(
        config(&srv.url(), Some(dir.path())).with_flush_interval(Duration::from_millis(300)),
    )
    .unwrap();
    let mut ids = emit_n(&r, 0, 3);
    let big = Event::Built(Box::new(telemetry::Envelope::new(
        "stream_heartbeat",
        telemetry::Fields::new().meta("big", true),
    )));
    let big_id = big.id().into_owned();
    r.emit(big);
    ids.extend(emit_n(&r, 3, 5));
    let s = settle(&r, "all resolved", |s| {
        s.acked + s.dropped() == 9 && s.buffered == 0
    });
    assert_eq!(s.acked, 8);
    assert_eq!(s.dropped_oversize, 1, "{s:?}");
    assert!(s.splits_413 >= 2, "{s:?}");
    let answered_413 = srv.received().iter().filter(|q| q.status == 413).count() as u64;
    assert_eq!(
        s.status_413, answered_413,
        "every 413 answer counted (splits and the lone drop): {s:?}"
    );
    assert_eq!(s.status_413, s.splits_413 + 1, "{s:?}");
    assert_conserved(&s);
    let accepted = srv.accepted_ids();
    assert_eq!(accepted, ids, "every other event exactly once, in order");
    assert!(!accepted.contains(&big_id));
    // The big event was tried alone before being dropped.
    assert!(srv
        .received()
        .iter()
        .any(|q| q.ids() == vec![big_id.clone()] && q.status == 413));
}

#[test]
fn contract_429_waits_retry_after_else_the_default() {
    let srv = FaultServer::start();
    srv.script([
        Reply::status(429).header("retry-after", "1"),
        Reply::status(429),
        Reply::status(200),
    ]);
    let r = Reporter::start(config(&srv.url(), None)).unwrap();
    let ids = emit_n(&r, 0, 4);
    let s = settle(&r, "acked", |s| s.acked == 4);
    assert_eq!((s.status_429, s.retries), (2, 2), "{s:?}");
    let got = srv.received();
    assert_eq!(got.len(), 3, "one batch");
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    // Retry-After: 1 s; no header: the configured default (700 ms). Both far above the 50 ms backoff.
    assert!(
        gap1 >= Duration::from_millis(950) && gap1 < Duration::from_secs(5),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(650) && gap2 < Duration::from_secs(5),
        "{gap2:?}"
    );
    assert!(
        got.windows(2).all(|w| w[1].ids().starts_with(&w[0].ids())),
        "the kept batch is re-sent"
    );
    assert_eq!(srv.accepted_ids(), ids);
}

#[test]
fn contract_5xx_backs_off_doubling_and_retries() {
    let srv = FaultServer::start();
    srv.script([
        Reply::status(500),
        Reply::status(502),
        Reply::status(503),
        Reply::status(200),
    ]);
    let r = Reporter::start(
        config(&srv.url(), None).with_backoff(Duration::from_millis(200), Duration::from_secs(5)),
    )
    .unwrap();
    let ids = emit_n(&r, 0, 3);
    let s = settle(&r, "acked", |s| s.acked == 3);
    assert_eq!((s.status_5xx, s.retries), (3, 3), "{s:?}");
    let got = srv.received();
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    // 200, 400, 800 ms, each +-20%.
    for (gap, base) in gaps.iter().zip([200u64, 400, 800]) {
        let min = Duration::from_millis(base * 8 / 10);
        assert!(
            *gap >= min && *gap < Duration::from_secs(5),
            "gaps {gaps:?}"
        );
    }
    assert!(
        got.windows(2).all(|w| w[1].ids().starts_with(&w[0].ids())),
        "the kept batch is re-sent"
    );
    assert_eq!(srv.accepted_ids(), ids);
    // A 200 reset the backoff: the next failure waits ~200 ms again, not 1.6 s.
    srv.script([Reply::status(500), Reply::status(200)]);
    emit_n(&r, 3, 1);
    settle(&r, "acked again", |s| s.acked == 4);
    let got = srv.received();
    let gap = got[got.len() - 1].at - got[got.len() - 2].at;
    assert!(
        gap >= Duration::from_millis(160) && gap < Duration::from_millis(1200),
        "{gap:?}"
    );
}

#[test]
fn contract_network_error_backs_off_and_retries() {
    let addr = dead_addr();
    let dir = tempfile::tempdir().unwrap();
    let r = Reporter::start(config(
        &format!("http://{addr}/v1/metrics"),
        Some(dir.path()),
    ))
    .unwrap();
    let ids = emit_n(&r, 0, 20);
    let s = settle(&r, "network errors", |s| s.network_errors >= 3);
    assert_eq!((s.acked, s.buffered_disk), (0, 20), "kept on disk: {s:?}");
    let srv = FaultServer::start_on(addr);
    let s = settle(&r, "acked once the server is up", |s| s.acked == 20);
    assert!(s.retries >= 3);
    assert_conserved(&s);
    assert_eq!(srv.accepted_ids(), ids);
}

#[test]
fn the_disk_buffer_survives_a_restart_and_is_resent() {
    let addr = dead_addr();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/v1/metrics");
    let first = Reporter::start(config(&url, Some(dir.path()))).unwrap();
    let ids = emit_n(&first, 0, 300);
    settle(&first, "accepted on disk", |s| {
        s.accepted == 300 && s.buffered_disk == 300
    });
    // Stopped without delivering (the server is down): everything stays on disk.
    let left = first.shutdown(Duration::from_millis(200));
    assert_eq!(left.buffered_disk, 300);
    drop(first);
    let srv = FaultServer::start_on(addr);
    let second = Reporter::start(config(&url, Some(dir.path()))).unwrap();
    let s = settle(&second, "re-sent", |s| s.acked == 300);
    assert_eq!(s.recovered, 300);
    assert_conserved(&s);
    assert_eq!(srv.accepted_ids(), ids);
}

#[test]
fn an_unusable_disk_falls_back_to_memory_and_still_delivers() {
    let logs = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let srv = FaultServer::start();
    srv.script([Reply::status(503)]);
    let r = Reporter::start(config(&srv.url(), Some(&file.join("buffer")))).unwrap();
    let ids = emit_n(&r, 0, 5);
    let s = settle(&r, "acked from memory", |s| s.acked == 5);
    assert_eq!(s.accepted_memory, 5);
    assert!(!s.disk_ok && s.disk_errors >= 1, "{s:?}");
    assert_conserved(&s);
    assert_eq!(srv.accepted_ids(), ids);
    assert!(logs_contain(
        &logs,
        "disk buffer unusable; keeping events in memory"
    ));
}

#[test]
fn a_full_buffer_drops_the_oldest_and_reports_it() {
    let srv = FaultServer::start();
    srv.rule(|_| Some(Reply::status(503)));
    let r = Reporter::start(
        config(&srv.url(), None)
            .with_max_buffer(10)
            .with_backoff(Duration::from_millis(20), Duration::from_millis(50)),
    )
    .unwrap();
    let ids = emit_n(&r, 0, 30);
    let s = settle(&r, "capped", |s| {
        s.accepted >= 30 && s.handoff_pending == 0 && s.reports >= 1 && s.dropped_buffer_full >= 20
    });
    assert!(s.buffered <= 10, "{s:?}");
    // Let the last report be written, then deliver.
    std::thread::sleep(Duration::from_millis(200));
    srv.rule(|_| None);
    let s = settle(&r, "drained", |s| s.buffered == 0 && s.handoff_pending == 0);
    assert_conserved(&s);
    let got: Vec<Value> = srv
        .received()
        .iter()
        .filter(|q| q.status == 200)
        .flat_map(|q| q.events())
        .collect();
    let got_ids: HashSet<&str> = got.iter().filter_map(|e| e["id"].as_str()).collect();
    assert!(got_ids.contains(ids[29].as_str()), "the newest is kept");
    assert!(!got_ids.contains(ids[0].as_str()), "the oldest is dropped");
    let total = got
        .iter()
        .filter(|e| e["type"] == "telemetry_dropped")
        .map(|e| e["data"]["dropped_total"].as_u64().unwrap())
        .max()
        .expect("a telemetry_dropped report arrived");
    assert_eq!(
        total, s.dropped_buffer_full,
        "the report covers every drop: {s:?}"
    );
}

#[test]
fn disk_cap_drops_are_reported_as_telemetry_dropped() {
    let addr = dead_addr();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/v1/metrics");
    let opts = SpoolOptions {
        max_bytes: 16 << 10,
        segment_bytes: 2 << 10,
        ..SpoolOptions::default()
    };
    let r = Reporter::start(config(&url, Some(dir.path())).with_spool_options(opts)).unwrap();
    emit_n(&r, 0, 400);
    let s = settle(&r, "spool dropped", |s| {
        s.handoff_pending == 0 && s.dropped_spool > 0 && s.reports >= 1
    });
    std::thread::sleep(Duration::from_millis(200));
    let srv = FaultServer::start_on(addr);
    let s2 = settle(&r, "drained", |s| s.buffered == 0);
    assert!(s2.dropped_spool >= s.dropped_spool);
    assert_conserved(&s2);
    let reports: Vec<Value> = srv
        .received()
        .iter()
        .flat_map(|q| q.events())
        .filter(|e| e["type"] == "telemetry_dropped")
        .collect();
    let total = reports
        .iter()
        .map(|e| e["data"]["dropped_total"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(total, s2.dropped_spool, "{s2:?}");
    assert_eq!(reports[0]["data"]["sink"], "http_reporter");
}

#[test]
fn bodies_splice_the_envelope_bytes_verbatim() {
    let srv = FaultServer::start();
    let r = Reporter::start(config(&srv.url(), None)).unwrap();
    let data = r#"{ "type":"stream_heartbeat", "client_source":"scope","fps_in":29.970000000000002,"x":{"b":[1, 2.50]},"u":"\u00e9"}"#;
    let env = format!(
        r#"{{"id":"raw-1","type":"stream_trace","timestamp":"1700000000000","data":{data},"relayed_via":"trickle"}}"#
    );
    r.emit(Event::Raw(
        RawEnvelope::parse(env.into_bytes().into()).unwrap(),
    ));
    settle(&r, "acked", |s| s.acked == 1);
    let raw = String::from_utf8(srv.received()[0].raw.clone()).unwrap();
    assert_eq!(
        raw,
        format!(
            r#"{{"app":"scope","host":"test-host","events":[{{"type":"stream_heartbeat","data":{data},"id":"raw-1","timestamp":"1700000000000","relayed_via":"trickle"}}]}}"#
        )
    );
}

#[test]
fn gzip_is_used_once_the_server_advertises_it() {
    let srv = FaultServer::start();
    srv.advertise_gzip(true);
    let r = Reporter::start(config(&srv.url(), None).with_flush_interval(Duration::from_secs(60)))
        .unwrap();
    emit_n(&r, 0, 20);
    assert_eq!(r.flush_timeout(WAIT), FlushOutcome::Drained);
    emit_n(&r, 20, 20);
    assert_eq!(r.flush_timeout(WAIT), FlushOutcome::Drained);
    let got = srv.received();
    assert!(!got[0].gzip, "nothing advertised yet");
    assert!(
        got.last().unwrap().gzip,
        "advertised by the previous answer"
    );
    assert_eq!(got.iter().map(|q| q.ids().len()).sum::<usize>(), 40);

    let never = FaultServer::start();
    never.advertise_gzip(true);
    let r = Reporter::start(config(&never.url(), None).with_gzip(GzipMode::Never)).unwrap();
    for round in 0..2 {
        emit_n(&r, round * 20, 20);
        assert_eq!(r.flush_timeout(WAIT), FlushOutcome::Drained);
    }
    assert!(never.received().iter().all(|q| !q.gzip));
}

#[test]
fn flush_sends_at_once_and_shutdown_leaves_the_rest_on_disk() {
    let srv = FaultServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A one-minute flush interval: only the flush can explain a quick delivery.
    let r = Reporter::start(
        config(&srv.url(), Some(dir.path())).with_flush_interval(Duration::from_secs(60)),
    )
    .unwrap();
    emit_n(&r, 0, 10);
    let t = Instant::now();
    assert_eq!(r.flush_timeout(WAIT), FlushOutcome::Drained);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(srv.accepted_ids().len(), 10);
    // Now the server fails: shutdown gives up at its timeout and keeps the events on disk.
    srv.rule(|_| Some(Reply::status(503)));
    emit_n(&r, 10, 7);
    let s = r.shutdown(Duration::from_millis(300));
    assert_eq!((s.acked, s.buffered_disk), (10, 7), "{s:?}");
    r.emit(event("late", 0));
    assert_eq!(
        r.reporter_stats().dropped_handoff,
        1,
        "emit after shutdown is counted"
    );
    drop(r);
    let (spool, _) = spool::Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(spool.len(), 7);
}

#[test]
fn invalid_envelopes_are_dropped_and_counted_not_sent() {
    let srv = FaultServer::start();
    let r = Reporter::start(config(&srv.url(), None)).unwrap();
    // A forwarded envelope whose `data` is not an object cannot become an API event (it would
    // 400 a batch).
    r.emit(Event::Raw(
        RawEnvelope::parse(br#"{"id":"x","data":[1]}"#.to_vec().into()).unwrap(),
    ));
    let ids = emit_n(&r, 0, 2);
    let s = settle(&r, "resolved", |s| {
        s.dropped_invalid == 1 && s.buffered == 0 && s.reports >= 1 && s.acked >= 3
    });
    assert_conserved(&s);
    let got = srv.accepted_ids();
    assert!(
        got.starts_with(&ids) || got.iter().filter(|i| ids.contains(i)).count() == 2,
        "{got:?}"
    );
    assert!(!got.contains(&"x".to_string()));
}

#[test]
fn a_disk_that_comes_back_takes_over_the_events_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("state");
    std::fs::write(
        &blocker,
        b"a file where the buffer's parent directory should be",
    )
    .unwrap();
    let buffer = blocker.join("buffer");
    let srv = FaultServer::start();
    srv.rule(|_| Some(Reply::status(503)));
    let r = Reporter::start(config(&srv.url(), Some(&buffer))).unwrap();
    let ids = emit_n(&r, 0, 30);
    settle(&r, "kept in memory", |s| {
        s.buffered_memory == 30 && !s.disk_ok
    });
    // The operator fixes the path: the next retry opens the disk and moves memory there.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir_all(&buffer).unwrap();
    let s = settle(&r, "moved to disk", |s| {
        s.disk_ok && s.buffered_disk == 30 && s.buffered_memory == 0
    });
    assert_eq!(s.accepted_memory, 30);
    // Now durable: a stop and restart keeps them.
    r.shutdown(Duration::from_millis(100));
    drop(r);
    srv.rule(|_| None);
    let r = Reporter::start(config(&srv.url(), Some(&buffer))).unwrap();
    let s = settle(&r, "re-sent after restart", |s| s.acked == 30);
    assert_eq!(s.recovered, 30);
    assert_eq!(srv.accepted_ids(), ids);
}

#[test]
fn envelopes_without_data_type_are_sent_as_the_seed_maps_them() {
    let srv = FaultServer::start();
    let r = Reporter::start(config(&srv.url(), None)).unwrap();
    for env in [
        r#"{"id":"u1","type":"stream_trace","timestamp":1700000000000,"data":{"a":1}}"#,
        r#"{"id":"u2","data":{"a":2}}"#,
        r#"{"id":"u3","type":"stream_trace"}"#,
    ] {
        r.emit(Event::Raw(
            RawEnvelope::parse(env.as_bytes().to_vec().into()).unwrap(),
        ));
    }
    let s = settle(&r, "acked", |s| s.acked == 3);
    assert_eq!(s.dropped(), 0, "{s:?}");
    let got: Vec<Value> = srv.received().iter().flat_map(|q| q.events()).collect();
    let by_id = |id: &str| got.iter().find(|e| e["id"] == id).cloned().unwrap();
    // data.type absent: the envelope's type, else "unknown"; no data: {}; timestamp a string.
    assert_eq!(by_id("u1")["type"], "stream_trace");
    assert_eq!(by_id("u1")["timestamp"], "1700000000000");
    assert_eq!(by_id("u2")["type"], "unknown");
    assert_eq!(by_id("u3")["data"], serde_json::json!({}));
}
