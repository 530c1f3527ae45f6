//! `GET /api/v1/logs/tail` answers Scope's contract exactly, the way its UI and MCP server poll
//! it: `{"lines": [...], "offset": <int>}`, `since_offset` for only what is new, 422 out of bounds,
//! and lines in Scope's log format (`<asctime> - <name> - <LEVEL> - <message>`).

mod common;

use common::{create_session_channels, free_addr, serve, wait_listening, wait_until, Proc};
use serde_json::{json, Value};
use std::time::Duration;

fn get(url: &str) -> (u16, Value) {
    let r = reqwest::blocking::get(url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Publishes one telemetry line to the events channel as segment `seq`: the client logs it (log
/// sink) as a known line.
fn publish_telemetry(events: &str, seq: u32, id: &str) {
    let line = json!({"type": "telemetry", "event": {"id": id, "type": "stream_trace",
        "timestamp": "1700000000000", "data": {"type": "pipeline_loaded", "client_source": "scope"}}});
    let status = reqwest::blocking::Client::new()
        .post(format!("{events}/{seq}"))
        .body(format!("{line}\n"))
        .send()
        .expect("publish")
        .status();
    assert!(status.is_success());
}

/// `2026-06-02 11:08:33,123 - relay.client - INFO - ...`, as Python's logging writes Scope's file.
fn scope_format(line: &str) -> bool {
    let Some((time, rest)) = line.split_at_checked(23) else {
        return false;
    };
    let shape: String = time
        .chars()
        .map(|c| if c.is_ascii_digit() { 'd' } else { c })
        .collect();
    let mut parts = rest.splitn(4, " - ");
    shape == "dddd-dd-dd dd:dd:dd,ddd"
        && parts.next() == Some("")
        && parts
            .next()
            .is_some_and(|name| !name.is_empty() && !name.contains(' '))
        && parts
            .next()
            .is_some_and(|l| ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"].contains(&l))
        && parts.next().is_some()
}

#[test]
fn logs_tail_follows_scopes_offset_contract() {
    let server = free_addr();
    let _serve = serve(server, &[]);
    let (control, events) = create_session_channels(server);
    let http = free_addr();
    let _client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--egress",
            "log",
            "--http",
            &http.to_string(),
        ],
        None,
    );
    wait_listening(http);
    let tail = format!("http://{http}/api/v1/logs/tail");

    // The shape, exactly; defaults lines=200, since_offset=0.
    let (status, first) = get(&tail);
    assert_eq!(status, 200);
    let keys: Vec<&String> = first.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["lines", "offset"], "{first}");
    let start = first["offset"].as_u64().expect("offset is an integer");
    for l in first["lines"].as_array().unwrap() {
        assert!(scope_format(l.as_str().unwrap()), "not Scope's format: {l}");
    }

    // A poller passing back the offset gets only what was written since, never a line twice.
    let (mut offset, mut seen) = (start, Vec::new());
    for (seq, id) in [(0, "000000000001"), (1, "000000000002")] {
        publish_telemetry(&events, seq, &format!("aaaaaaaa-0000-4000-8000-{id}"));
        wait_until("the TELEMETRY line", Duration::from_secs(20), || {
            let (_, page) = get(&format!("{tail}?since_offset={offset}&lines=1000"));
            offset = page["offset"].as_u64().unwrap();
            let new = page["lines"].as_array().unwrap().iter();
            seen.extend(new.map(|l| l.as_str().unwrap().to_string()));
            seen.iter().any(|l| l.contains(id))
        });
    }
    assert!(offset > start);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a line was served twice: {seen:#?}"
    );
    for id in ["000000000001", "000000000002"] {
        let n = seen
            .iter()
            .filter(|l| l.contains(&format!("id=aaaaaaaa-0000-4000-8000-{id} ")))
            .count();
        assert_eq!(n, 1, "TELEMETRY line {id} served {n} times: {seen:#?}");
    }
    assert!(seen.iter().all(|l| scope_format(l)), "{seen:#?}");
    // Everything after `start`, read in one go, is exactly what the poller collected.
    let (_, all) = get(&format!("{tail}?since_offset={start}&lines=1000"));
    let all_lines: Vec<String> = all["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        &all_lines[..seen.len()],
        &seen[..],
        "the poller missed or reordered a line"
    );

    // Offsets at or past the end: no lines, and the current size to go on from.
    let (status, past) = get(&format!("{tail}?since_offset=999999999999"));
    assert_eq!(status, 200);
    assert_eq!(past["lines"], json!([]));
    assert!(past["offset"].as_u64().unwrap() >= offset);
    // `lines` keeps the last lines.
    let (_, one) = get(&format!("{tail}?lines=1"));
    assert_eq!(one["lines"].as_array().unwrap().len(), 1);
    let (status, _) = get(&format!("{tail}?lines=1000"));
    assert_eq!(status, 200);

    // Out of bounds or not integers: 422 with FastAPI's validation body.
    for (query, loc, kind) in [
        ("lines=0", "lines", "greater_than_equal"),
        ("lines=1001", "lines", "less_than_equal"),
        ("lines=-5", "lines", "greater_than_equal"),
        ("lines=ten", "lines", "int_parsing"),
        ("since_offset=-1", "since_offset", "greater_than_equal"),
        ("since_offset=1.5", "since_offset", "int_parsing"),
    ] {
        let (status, body) = get(&format!("{tail}?{query}"));
        assert_eq!(status, 422, "{query}: {body}");
        let detail = &body["detail"][0];
        assert_eq!(detail["loc"], json!(["query", loc]), "{query}: {body}");
        assert_eq!(detail["type"], kind, "{query}: {body}");
        assert!(detail["msg"].is_string(), "{query}: {body}");
    }
    let (status, body) = get(&format!("{tail}?lines=0&since_offset=-1"));
    assert_eq!(
        (status, body["detail"].as_array().map(Vec::len)),
        (422, Some(2)),
        "{body}"
    );
}
