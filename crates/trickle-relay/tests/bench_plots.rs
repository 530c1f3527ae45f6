//! Every `trickle-relay bench` (but relay, see bench_relay.rs) as a process, on a tiny workload
//! with `--json --plot`: the summary has the shared fields and the plot is a two-panel SVG.
//! Functional checks of the harness, not timed tests. The kafka bench starts its own `tansu`.

use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");

/// Runs `bench <name> <args> --json --plot <tmp>/<name>.svg`; returns the summary and the SVG.
fn bench(name: &str, args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join(format!("{name}.svg"));
    let out = Command::new(BIN)
        .args(["--log", "warn", "bench", name])
        .args(args)
        .arg("--json")
        .arg("--plot")
        .arg(&plot)
        .env_remove("SCOPE_TELEMETRY_DISABLED")
        .env_remove("DO_NOT_TRACK")
        .output()
        .unwrap_or_else(|e| panic!("run trickle-relay bench {name}: {e}"));
    assert!(
        out.status.success(),
        "bench {name} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench {name}: stdout is not the JSON summary ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let svg = std::fs::read_to_string(&plot)
        .unwrap_or_else(|e| panic!("bench {name}: no plot at {}: {e}", plot.display()));
    (summary, svg)
}

/// The fields every bench's JSON shares, and a two-panel SVG drawing what `curves` names.
fn check(bench_json_name: &str, summary: &Value, svg: &str, latency: usize, throughput: usize) {
    assert_eq!(summary["bench"], bench_json_name, "{summary}");
    assert!(
        summary["cpus"].as_u64().is_some_and(|n| n > 0),
        "cpus: {summary}"
    );
    let plot = summary["plot"].as_str().expect("plot names the SVG");
    assert!(plot.ends_with(".svg"), "{plot}");
    let curves = &summary["curves"];
    let lat = curves["latency"].as_array().expect("curves.latency");
    assert_eq!(lat.len(), latency, "latency series: {curves}");
    for l in lat {
        assert!(l["samples"].as_u64().is_some_and(|n| n > 0), "{l}");
        for k in ["median", "p99", "max"] {
            assert!(l["ns"][k].as_u64().is_some(), "latency ns.{k}: {l}");
        }
        assert!(l["ns"]["median"].as_u64() <= l["ns"]["max"].as_u64(), "{l}");
    }
    let thr = curves["throughput"].as_array().expect("curves.throughput");
    assert_eq!(thr.len(), throughput, "throughput series: {curves}");
    for t in thr {
        assert!(t["total"].as_u64().is_some_and(|n| n > 0), "{t}");
        assert!(t["mean_per_sec"].as_f64().is_some_and(|r| r > 0.0), "{t}");
    }

    let svg = svg.trim_end();
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.ends_with("</svg>"), "the SVG is not closed");
    assert_eq!(svg.matches("<svg").count(), 1);
    assert!(svg.contains("Latency distribution"), "no latency panel");
    assert!(svg.contains("Throughput over time"), "no throughput panel");
    assert!(svg.contains("percentile"), "latency x axis label");
    assert!(svg.contains("(s)</text>"), "time axis label with its unit");
    assert!(svg.contains("<polyline"), "no lines drawn");
    // Median, p99 and max: dots on the curves, their values in the legend.
    assert!(svg.contains("<circle"), "no marks on the curves");
    assert!(
        svg.contains(": p50 ") && svg.contains(" · p99 ") && svg.contains(" · max "),
        "median, p99 and max not in the legend"
    );
    // Every element opened is closed: a cheap well-formedness check.
    let opened = svg.matches("<text").count();
    assert_eq!(opened, svg.matches("</text>").count());
}

#[test]
fn fanout_plots_and_summarises() {
    let (s, svg) = bench(
        "fanout",
        &[
            "--bytes",
            "2000000",
            "--subscribers",
            "2",
            "--repeat",
            "2",
            "--latency-iters",
            "20",
        ],
    );
    check("fanout", &s, &svg, 1, 2);
    assert_eq!(s["subscribers"], 2);
    assert!(s["aggregate_bytes_per_sec"]["median"].as_f64().unwrap() > 0.0);
    assert_eq!(s["first_byte_latency_us"]["samples"], 20);
    assert!(svg.contains("GB/s"));
}

#[test]
fn fanout_copy_plots_and_summarises() {
    // Pieces that do not divide the segment, so a vectored write starts mid-piece.
    let (s, svg) = bench(
        "fanout-copy",
        &[
            "--bytes",
            "3000000",
            "--chunk-bytes",
            "10000",
            "--subscribers",
            "3",
            "--repeat",
            "2",
        ],
    );
    check("fanout_copy", &s, &svg, 2, 4);
    let modes = s["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().filter_map(|m| m["mode"].as_str()).collect();
    assert_eq!(names, ["write", "sendfile"], "{s}");
    for m in modes {
        assert_eq!(m["runs"], 2, "{m}");
        assert!(
            m["cpu_secs_per_gb"]["median"].as_f64().unwrap() > 0.0,
            "{m}"
        );
        assert!(
            m["aggregate_bytes_per_sec"]["median"].as_f64().unwrap() > 0.0,
            "{m}"
        );
    }
    // Every run delivered the whole segment to every subscriber.
    for t in s["curves"]["throughput"].as_array().expect("throughput") {
        assert_eq!(t["total"], 3 * 3_000_000, "{t}");
    }
    assert!(svg.contains("GB/s"));
}

#[test]
fn publish_event_plots_and_summarises() {
    let (s, svg) = bench(
        "publish-event",
        &["--calls", "3000", "--warmup", "100", "--threads", "2"],
    );
    check("publish_event", &s, &svg, 3, 3);
    let scenarios = s["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 3);
    assert_eq!(scenarios[2]["calls"], 6000);
    assert_eq!(s["curves"]["throughput"][2]["total"], 6000);
}

#[test]
fn spool_plots_and_summarises() {
    let (s, svg) = bench(
        "spool",
        &[
            "--events",
            "2000",
            "--always-events",
            "20",
            "--threads",
            "2",
            "--repeat",
            "1",
        ],
    );
    check("spool", &s, &svg, 4, 6);
    let names: Vec<&str> = s["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|x| x["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            "append_group",
            "append_group_threads",
            "append_never",
            "append_always",
            "read_ack",
            "read_ack_never"
        ]
    );
    assert_eq!(s["curves"]["throughput"][0]["total"], 2000);
    assert!(
        s["scenarios"][0]["events_per_sec"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn http_egress_plots_and_summarises() {
    let (s, svg) = bench("http-egress", &["--events", "2000", "--repeat", "1"]);
    check("http-egress", &s, &svg, 3, 6);
    let scenarios = s["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 3);
    // Every event emitted is accepted (accept) or acknowledged (e2e), and the plot counted them.
    for line in s["curves"]["throughput"].as_array().unwrap() {
        assert_eq!(line["total"], 2000, "{line}");
    }
}

#[test]
fn kafka_plots_and_summarises() {
    let (s, svg) = bench(
        "kafka",
        &["--events", "1000", "--repeat", "1", "--partitions", "1"],
    );
    check("kafka", &s, &svg, 3, 6);
    for line in s["curves"]["throughput"].as_array().unwrap() {
        assert_eq!(line["total"], 1000, "{line}");
    }
    let names: Vec<&str> = s["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|x| x["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["sink_disk", "sink_memory", "collector_output"]);
}

#[test]
fn a_plot_in_a_missing_folder_fails_before_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plot = dir.path().join("missing").join("spool.svg");
    let out = Command::new(BIN)
        .args(["--log", "warn", "bench", "spool", "--repeat", "1", "--plot"])
        .arg(&plot)
        .output()
        .expect("run trickle-relay bench spool");
    assert!(!out.status.success(), "an unwritable --plot must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--plot") && err.contains("does not exist"),
        "the error names the flag and the fix: {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
