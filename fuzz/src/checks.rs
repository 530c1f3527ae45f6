//! One check per fuzz target: feed outside input to a parser, assert it never panics and that
//! whatever it accepts satisfies the parser's contract.
//!
//! Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the stable corpus replay test
//! (`crates/trickle-relay/tests/fuzz_corpus.rs`, via `#[path]`), so the two cannot drift.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
use trickle::jsonl::{decode_line, LineSplitter, SplitEvent};
use trickle::messages::{ControlMessage, EventMessage};

/// A target's check: panics when the input breaks the parser's contract.
pub type Check = fn(&[u8]);

/// Every target, by corpus directory name (what the replay test iterates over).
pub const TARGETS: [(&str, Check); 5] = [
    ("jsonl_lines", jsonl_lines),
    ("messages", messages),
    ("envelope", envelope),
    ("collector_validate", collector_validate),
    ("server_request", server_request),
];

/// What a line splitter must produce for `data`, computed the obvious way (whole input at once).
fn reference_split(data: &[u8], max: usize) -> Vec<SplitEvent> {
    let blank = |l: &[u8]| l.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'));
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // The piece after the last `\n` is the unterminated tail.
    let tail = parts.pop().unwrap_or(&[]);
    for line in parts {
        if line.len() > max {
            out.push(SplitEvent::Oversize { len: line.len() });
        } else if !blank(line) {
            out.push(SplitEvent::Line(Bytes::copy_from_slice(line)));
        }
    }
    if tail.len() > max {
        out.push(SplitEvent::Oversize { len: tail.len() });
    } else if !blank(tail) {
        out.push(SplitEvent::Unterminated(Bytes::copy_from_slice(tail)));
    }
    out
}

/// `LineSplitter` fed `data` in arbitrary chunks gives exactly the reference split, and every line
/// `decode_line` accepts is a JSON object (as a `Value`, a `ControlMessage`, an `EventMessage`).
///
/// Input layout: byte 0 picks the line limit (1..=256), byte 1 seeds the chunk sizes.
pub fn jsonl_lines(data: &[u8]) {
    let (max, seed, body) = match data {
        [a, b, rest @ ..] => (usize::from(*a) + 1, usize::from(*b), rest),
        _ => return,
    };
    let mut splitter = LineSplitter::new(max);
    let mut got = Vec::new();
    let mut rest = body;
    let mut i = 0usize;
    while !rest.is_empty() {
        let n = (1 + (seed.wrapping_mul(31).wrapping_add(i * 7)) % 17).min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        splitter.push(Bytes::copy_from_slice(chunk));
        while let Some(ev) = splitter.next_event() {
            got.push(ev);
        }
        rest = tail;
        i += 1;
    }
    if let Some(ev) = splitter.finish() {
        got.push(ev);
    }
    assert_eq!(got, reference_split(body, max), "max {max} seed {seed}");

    for ev in &got {
        if let SplitEvent::Line(line) = ev {
            decode_contract(line, max);
        }
    }
    // The whole input as one line, under a generous limit.
    decode_contract(body, 1 << 20);
}

fn decode_contract(line: &[u8], max: usize) {
    if let Ok(v) = decode_line::<Value>(line, max) {
        assert!(v.is_object(), "decode_line accepted a non-object: {v}");
        assert!(line.len() <= max);
    }
    if let Ok(m) = decode_line::<ControlMessage>(line, max) {
        control_roundtrip(&m);
    }
    if let Ok(m) = decode_line::<EventMessage>(line, max) {
        event_roundtrip(&m);
    }
}

fn control_roundtrip(m: &ControlMessage) {
    let once = serde_json::to_vec(m).expect("a decoded ControlMessage serializes");
    let back: ControlMessage =
        serde_json::from_slice(&once).expect("a serialized ControlMessage decodes");
    let twice = serde_json::to_vec(&back).expect("serializes again");
    assert_eq!(
        String::from_utf8_lossy(&once),
        String::from_utf8_lossy(&twice),
        "ControlMessage encoding is not stable"
    );
}

fn event_roundtrip(m: &EventMessage) {
    let once = serde_json::to_vec(m).expect("a decoded EventMessage serializes");
    let back: EventMessage =
        serde_json::from_slice(&once).expect("a serialized EventMessage decodes");
    let twice = serde_json::to_vec(&back).expect("serializes again");
    assert_eq!(
        String::from_utf8_lossy(&once),
        String::from_utf8_lossy(&twice),
        "EventMessage encoding is not stable"
    );
    if let (EventMessage::Telemetry(a), EventMessage::Telemetry(b)) = (m, &back) {
        assert_eq!(
            a.event.get(),
            b.event.get(),
            "telemetry event not byte-exact"
        );
    }
}

/// `ControlMessage` / `EventMessage` straight from bytes (what `serde_json::from_slice` callers
/// do): never panics; whatever decodes re-encodes to the same bytes, and a telemetry event is
/// carried byte for byte.
pub fn messages(data: &[u8]) {
    if let Ok(m) = serde_json::from_slice::<ControlMessage>(data) {
        control_roundtrip(&m);
    }
    if let Ok(m) = serde_json::from_slice::<EventMessage>(data) {
        event_roundtrip(&m);
        if let EventMessage::Telemetry(t) = &m {
            envelope(t.event.get().as_bytes());
        }
    }
}

/// `RawEnvelope::parse`: never panics; an accepted envelope is a JSON object with that non-empty
/// `id`, and the relay's annotations (inside `data`) keep it a valid envelope with the same id,
/// adding only what `data` lacks and changing nothing else.
pub fn envelope(data: &[u8]) {
    let Ok(mut env) = telemetry::RawEnvelope::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    let id = env.id().to_owned();
    assert!(!id.is_empty(), "accepted an envelope without id");
    // Top-level members as raw JSON: checks it is an object without `Value`'s depth limit (deep
    // nesting is valid JSON, and every hop, collector included, accepts it).
    let top: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(env.as_bytes()).expect("accepted envelope is a JSON object");
    let data: Option<HashMap<String, Box<RawValue>>> = match top.get("data") {
        Some(d) if d.get().starts_with('{') => {
            Some(serde_json::from_str(d.get()).expect("data is an object"))
        }
        Some(_) => None,
        None => Some(HashMap::new()),
    };
    let had_via = data.as_ref().is_some_and(|d| d.contains_key("relayed_via"));
    let had_ts = data
        .as_ref()
        .is_some_and(|d| d.contains_key("relay_received_timestamp"));
    let before = env.as_bytes().clone();
    let added = env.annotate_relay("trickle", 1_700_000_000_000);
    assert_eq!(added, data.is_some() && !(had_via && had_ts));
    let again = telemetry::RawEnvelope::parse(env.as_bytes().clone())
        .expect("an annotated envelope parses again");
    assert_eq!(again.id(), id, "annotation changed the id");
    if !added {
        assert_eq!(
            env.as_bytes(),
            &before,
            "nothing added, yet the bytes changed"
        );
        return;
    }
    if !had_via {
        assert_eq!(again.relayed_via(), Some("trickle"));
    }
    if !had_ts {
        assert_eq!(again.relay_received_timestamp(), Some("1700000000000"));
    }
    // Only bytes were inserted: the original is the annotated text with one run removed.
    let after = env.as_bytes();
    let prefix = before
        .iter()
        .zip(after.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let extra = after.len() - before.len();
    assert_eq!(
        &after[prefix + extra..],
        &before[prefix..],
        "an original byte changed"
    );
}

/// The collector's `POST /v1/metrics` body validation: never panics; what it accepts is at most
/// `max` events, each an object whose `id` is the one reported and whose bytes are in the body.
pub fn collector_validate(data: &[u8]) {
    const MAX: usize = 8;
    let Ok(events) = collector::validate::validate(data, MAX) else {
        return;
    };
    assert!(events.len() <= MAX);
    for ev in events {
        let v: HashMap<String, Box<RawValue>> =
            serde_json::from_slice(&ev.json).expect("accepted event is a JSON object");
        let id: Option<String> = v.get("id").and_then(|r| serde_json::from_str(r.get()).ok());
        assert_eq!(id.as_deref(), Some(ev.id.as_str()), "reported id differs");
        assert!(v.get("data").is_some_and(|r| r.get().starts_with('{')));
        assert!(v.get("type").is_some_and(|r| r.get().starts_with('"')));
        assert!(
            data.windows(ev.json.len()).any(|w| w == &ev.json[..]),
            "event bytes are not the body's"
        );
    }
}

/// A real trickle server on loopback, started once per process, with one live channel.
struct Harness {
    addr: SocketAddr,
    live: String,
}

/// Set when a thread of the server's runtime panics (tokio would otherwise swallow it).
static SERVER_PANICKED: AtomicBool = AtomicBool::new(false);

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("fuzz-server"))
            {
                SERVER_PANICKED.store(true, Ordering::SeqCst);
            }
            prev(info)
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("fuzz-server")
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let config = trickle::server::ServerConfig {
                    autocreate: true,
                    max_channels: 2000,
                    max_segment_bytes: 1 << 20,
                    idle_timeout: Duration::from_secs(5),
                    ..Default::default()
                };
                let server =
                    trickle::server::Server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config)
                        .await
                        .expect("bind");
                // `_`-prefixed: never swept, so it outlives the short idle timeout set for fuzz-made channels.
                let live = format!("_live-{}", trickle::server::random_channel_name());
                server
                    .channels()
                    .create(&live, Some("application/jsonl"))
                    .expect("create live channel");
                tx.send((server.local_addr(), live)).expect("send addr");
                // Serve for the life of the process.
                std::future::pending::<()>().await;
                drop(server);
            });
        });
        let (addr, live) = rx.recv().expect("server started");
        Harness { addr, live }
    })
}

/// Sends `bytes`, half-closes, and reads what comes back until EOF or a quiet timeout; true when
/// it ended at EOF (the server closed the connection).
fn exchange(addr: SocketAddr, bytes: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).expect("server accepts");
    let _ = s.set_read_timeout(Some(quiet));
    // The server may answer and close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Err(_) => return (out, false),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() > (1 << 20) {
                    return (out, false);
                }
            }
        }
    }
}

/// The answer RFC 9112 requires when the framing of the first request in `data` is faulty (its
/// head complete): 400 for an ambiguous length (both Content-Length and Transfer-Encoding, a
/// Transfer-Encoding not ending in exactly one chunked, Transfer-Encoding in HTTP/1.0, a
/// Content-Length that is not plain digits or that differs from another), 501 for a coding
/// other than chunked before it. `None` when the framing is sound or the head incomplete.
fn faulty_framing(data: &[u8]) -> Option<u16> {
    // The server passes over blank lines before a request, and refuses heads over 16 KiB.
    let start = data.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&data[start..]) {
        Ok(httparse::Status::Complete(n)) if n <= 16 * 1024 => {}
        _ => return None,
    }
    let mut lengths: Vec<u64> = Vec::new();
    let mut codings: Option<Vec<String>> = None;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || value.len() > 18 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Some(400);
            }
            lengths.push(value.parse().ok()?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings.get_or_insert_with(Vec::new).extend(
                value
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .filter(|c| !c.is_empty()),
            );
        }
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Some(400);
    }
    let codings = codings?;
    let chunked = codings.iter().filter(|c| *c == "chunked").count();
    if req.version == Some(0)
        || !lengths.is_empty()
        || codings.last().map(String::as_str) != Some("chunked")
        || chunked > 1
    {
        return Some(400);
    }
    (codings.len() > 1).then_some(501)
}

/// Raw bytes as one HTTP/1.1 connection to a real trickle server (its head parser, chunked
/// decoder and routes are crate-private, so they are reached the way a client reaches them):
/// the answer, if any, is an HTTP response; afterwards the server still serves a legit request.
pub fn server_request(data: &[u8]) {
    let h = harness();
    let faulty = faulty_framing(data);
    // A faulty head is answered and closed at once; others may wait for more input.
    let quiet = Duration::from_millis(if faulty.is_some() { 5000 } else { 200 });
    let (answer, closed) = exchange(h.addr, data, quiet);
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP response: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    assert!(
        !SERVER_PANICKED.load(Ordering::SeqCst),
        "the server panicked on {:?}",
        String::from_utf8_lossy(&data[..data.len().min(200)])
    );
    if let Some(status) = faulty {
        // One answer, then the connection closed: nothing behind it is served (no smuggling).
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")) && !text.contains("\nHTTP/1."),
            "faulty framing must get one {status} and nothing more: {:?} -> {:?}",
            String::from_utf8_lossy(&data[..data.len().min(300)]),
            &text[..text.len().min(600)]
        );
        assert!(
            closed,
            "the connection must be closed after faulty framing: {:?}",
            String::from_utf8_lossy(&data[..data.len().min(300)])
        );
    }
    let probe = format!(
        "GET /{}/next HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n",
        h.live
    );
    let (ok, _) = exchange(h.addr, probe.as_bytes(), Duration::from_secs(5));
    assert!(
        ok.starts_with(b"HTTP/1.1 200"),
        "server stopped serving after {:?}: {:?}",
        String::from_utf8_lossy(&data[..data.len().min(200)]),
        String::from_utf8_lossy(&ok[..ok.len().min(200)])
    );
}
