use std::time::Instant;
use telemetry::queue::PriorityQueue;
use telemetry::*;

fn heartbeat(i: u64) -> Fields {
    Fields::new()
        .session_id("5b0d8c1e-3f2a-4c47-9d51-8f2e4b6a7c90")
        .connection_id("conn-7f3a9b2c")
        .meta("mode", "video")
        .meta("frames_in", i)
        .meta("frames_out", i.saturating_sub(3))
        .meta("fps_in", 30.0 - (i % 7) as f64 * 0.01)
        .meta("fps_out", 29.5 - (i % 5) as f64 * 0.01)
        .meta("elapsed_ms", i * 33)
        .meta("since_last_heartbeat_ms", 1000 + i % 13)
        .meta("pipeline_fps", 24.75)
}

fn time<F: FnMut(u64)>(name: &str, n: u64, mut f: F) {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    println!(
        "{name:<30} {:>8.1} ns/op",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    let n = 2_000_000;
    time("fields build+drop", n, |i| {
        std::hint::black_box(heartbeat(i));
    });
    time("uuid v4", n, |_| {
        std::hint::black_box(uuid::Uuid::new_v4());
    });
    time("now_ms", n, |_| {
        std::hint::black_box(now_ms());
    });
    time("envelope new+drop", n, |i| {
        std::hint::black_box(Envelope::new("stream_heartbeat", heartbeat(i)));
    });
    time("event boxed+drop", n, |i| {
        std::hint::black_box(Event::from(Envelope::new("stream_heartbeat", heartbeat(i))));
    });
    let mut q = PriorityQueue::new(256);
    time("push full (evict)+build", n, |i| {
        let p = q.push(Event::from(Envelope::new("stream_heartbeat", heartbeat(i))));
        drop(p);
    });
    let mut buf = Vec::new();
    let e = Envelope::new("stream_heartbeat", heartbeat(7));
    time("serialize", n, |_| {
        buf.clear();
        e.write_json(&mut buf);
    });
    println!("{}", String::from_utf8_lossy(&buf));
}
