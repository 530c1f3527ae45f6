//! `trickle-relay bench sessions` as a process, on 20 sessions for a few seconds: a functional
//! check of the harness (every event accounted for, every figure present), not a timed test.

use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");

#[test]
fn bench_sessions_accounts_for_every_event_of_every_session() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join("sessions.svg");
    let out = Command::new(BIN)
        .args([
            "--log",
            "warn",
            "bench",
            "sessions",
            "--sessions",
            "20",
            "--heartbeat-ms",
            "200",
            "--duration-secs",
            "3",
            "--timeout-secs",
            "120",
            "--json",
        ])
        .arg("--plot")
        .arg(&plot)
        .env_remove("SCOPE_TELEMETRY_DISABLED")
        .env_remove("DO_NOT_TRACK")
        .output()
        .expect("run trickle-relay bench sessions");
    assert!(
        out.status.success(),
        "bench sessions failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("open-file limit"),
        "the bench states its open-file limit: {stderr}"
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON summary ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(summary["bench"], "sessions");
    assert_eq!(summary["heartbeat_ms"], 200);
    assert!(summary["open_files"]["soft"]
        .as_u64()
        .is_some_and(|n| n > 0));
    let runs = summary["runs"].as_array().expect("runs is an array");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["sessions"], 20);
    let events = &run["events"];
    let n = |v: &Value, k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} is a count: {v}"))
    };
    assert_eq!(n(events, "lost"), 0, "{events}");
    assert_eq!(n(events, "extra"), 0, "{events}");
    assert_eq!(n(events, "duplicates"), 0, "{events}");
    assert_eq!(n(events, "sessions_failed"), 0, "{events}");
    assert_eq!(n(events, "rejected"), 0, "{events}");
    assert_eq!(n(events, "skipped_segments"), 0, "{events}");
    assert_eq!(
        n(events, "emitted"),
        n(events, "egressed") + n(events, "dropped"),
        "every event egressed or counted as dropped: {events}"
    );
    assert_eq!(n(events, "dropped_reported"), n(events, "dropped"));
    // Nine lifecycle events per session, and heartbeats every 200 ms over the window.
    assert!(n(events, "emitted") >= 20 * (9 + 10), "{events}");
    assert!(n(run, "events_in_window") >= 20 * 10, "{run}");
    let window = &run["latency"]["window"];
    assert!(n(window, "samples") >= 20 * 10, "{window}");
    let ms = |k: &str| {
        window[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k}: {window}"))
    };
    assert!(ms("median_ms") > 0.0 && ms("median_ms") <= ms("p99_ms"));
    assert!(ms("p99_ms") <= ms("max_ms"));
    let server = &run["server"];
    assert!(n(server, "rss_kib") > n(server, "idle_rss_kib"), "{server}");
    assert!(server["rss_per_session_kib"].as_f64().is_some(), "{server}");
    assert!(server["cores_busy"].as_f64().is_some(), "{server}");
    assert!(server["cpu_us_per_event"].as_f64().is_some(), "{server}");
    // Each session holds a streaming and a preconnected request at each end of its two channels.
    assert!(n(server, "connections") >= 20 * 6, "{server}");
    assert!(
        n(server, "connections_after_teardown") < n(server, "connections"),
        "{server}"
    );
    assert!(run["setup_secs"].as_f64().is_some_and(|s| s > 0.0));
    assert!(run["teardown_secs"].as_f64().is_some_and(|s| s > 0.0));
    for who in ["runners_process", "clients_process"] {
        assert!(n(&run[who], "rss_kib") > 0, "{who}: {run}");
    }
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    for panel in ["Server memory", "Server CPU", "latency"] {
        assert!(svg.contains(panel), "the plot has the {panel} panel");
    }
}
