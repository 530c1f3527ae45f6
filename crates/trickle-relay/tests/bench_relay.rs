//! `trickle-relay bench relay` as a process: a functional check of the harness, not a timed test.

use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");

#[test]
fn bench_relay_json_summary_accounts_for_every_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join("relay.svg");
    let out = Command::new(BIN)
        .args([
            "bench",
            "relay",
            "--events",
            "2000",
            "--json",
            "--timeout-secs",
            "60",
        ])
        .arg("--plot")
        .arg(&plot)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run trickle-relay bench relay");
    assert!(
        out.status.success(),
        "bench relay failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not the JSON summary ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(summary["bench"], "relay");
    assert_eq!(summary["events"], 2000);
    let runs = summary["runs"].as_array().expect("runs is an array");
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    let n = |k: &str| {
        run[k]
            .as_u64()
            .unwrap_or_else(|| panic!("runs[0].{k} is a count: {run}"))
    };
    assert_eq!(n("emitted"), 2000);
    assert_eq!(
        n("emitted"),
        n("delivered") + n("dropped"),
        "every heartbeat is delivered or counted as dropped: {run}"
    );
    assert_eq!(run["lost"], 0);
    assert_eq!(run["lost_in_transit"], 0, "{run}");
    assert_eq!(
        run["sums_close"], true,
        "emitted = received + dropped + lost in transit: {run}"
    );
    assert_eq!(summary["flow_control"], true);
    assert_eq!(n("duplicates"), 0);
    assert_eq!(
        n("dropped_reported"),
        n("dropped"),
        "the runner's drops reach the client as telemetry_dropped"
    );
    assert!(n("delivered") > 0);
    for key in ["median", "p99", "max"] {
        assert!(
            run["latency_us"][key].as_u64().is_some(),
            "latency_us.{key}: {run}"
        );
        assert!(summary["summary"]["latency_us"][key]["median"].is_number());
    }
    for who in ["server", "runner", "client"] {
        let kib = run["peak_rss_kib"][who].as_u64().expect("peak RSS in KiB");
        assert!(kib > 0, "{who} peak RSS");
    }
    for key in ["sustained_events_per_s", "dropped", "delivered"] {
        let s = &summary["summary"][key];
        assert!(
            s["median"].is_number() && s["min"].is_number() && s["max"].is_number(),
            "summary.{key}: {s}"
        );
    }
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
}
