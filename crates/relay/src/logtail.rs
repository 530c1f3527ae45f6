//! This process's recent log lines, fed by a `tracing` layer, with byte offsets.
//!
//! The client serves it as Scope's `GET /api/v1/logs/tail` ([`crate::client::http`]); the runner
//! follows it to forward its own log lines to the client in `logs` batches.
//!
//! **Line format.** Each line is written the way Scope's log file writes one (Python `logging`
//! with `"%(asctime)s - %(name)s - %(levelname)s - %(message)s"`):
//! `2026-06-02 11:08:33,123 - relay.client - WARNING - message key=value`: local time with
//! milliseconds after a comma (Python's default `asctime`), the `tracing` target with `::` written
//! `.` (a Python logger name), Python's level names, then the message and its fields. The client
//! parses levels out of exactly this shape ([`parse_level`]), and Scope's UI shows these lines as
//! it shows its own. A message with newlines becomes several lines, as it would in a file.
//!
//! **Offsets.** The tail behaves as one log file that this process appends to and never rotates:
//! each line occupies its UTF-8 length plus one (`\n`) bytes, and a line's offset is where it
//! starts. [`LogTail::read`] answers Scope's `since_offset` / `offset` contract, so a poller that
//! passes back the `offset` it got never sees a line twice and never misses one while the process
//! runs, as long as it polls before [`DEFAULT_CAPACITY`] lines (and fewer than its `lines`) have
//! been written since its last poll: older lines leave memory, like a rotated-away file. A process
//! restart starts again at offset 0; a poller holding an older, larger offset then gets no lines
//! and the new offset (Scope's answer after its log file rotated), and reads on from there.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// How many lines the tail keeps by default (Scope's `lines` maximum).
pub const DEFAULT_CAPACITY: usize = 1000;

/// Recent log lines of this process, shared between the logging layer and its readers.
#[derive(Clone)]
pub struct LogTail {
    inner: Arc<Inner>,
}

struct Inner {
    log: Mutex<Log>,
    capacity: usize,
    // Followers (the runner's log forwarder) get every new line; lagging ones lose lines, never block.
    follow: broadcast::Sender<String>,
}

/// The retained lines with their offsets, and the size of the whole log so far.
struct Log {
    /// `(offset where the line starts, the line)`, oldest first.
    lines: VecDeque<(u64, String)>,
    /// Bytes written since the process started: the log's size.
    size: u64,
}

/// One answer of [`LogTail::read`]: Scope's `{"lines": [...], "offset": n}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TailPage {
    /// The lines, oldest first.
    pub lines: Vec<String>,
    /// The log's size now: pass it back as `since_offset` to read only what is new.
    pub offset: u64,
}

impl LogTail {
    /// A tail keeping the last `capacity` lines.
    pub fn new(capacity: usize) -> LogTail {
        let (follow, _) = broadcast::channel(4096);
        LogTail {
            inner: Arc::new(Inner {
                log: Mutex::new(Log {
                    lines: VecDeque::with_capacity(capacity.min(4096)),
                    size: 0,
                }),
                capacity: capacity.max(1),
                follow,
            }),
        }
    }

    /// The process-wide tail that [`LogTail::layer`] on the global subscriber feeds.
    pub fn global() -> &'static LogTail {
        static GLOBAL: OnceLock<LogTail> = OnceLock::new();
        GLOBAL.get_or_init(|| LogTail::new(DEFAULT_CAPACITY))
    }

    /// Appends one formatted entry; an entry with newlines is appended as one line each.
    pub fn push(&self, entry: String) {
        let mut log = self.inner.log.lock();
        for line in entry.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line).to_string();
            // A send error only means nobody follows right now.
            let _ = self.inner.follow.send(line.clone());
            if log.lines.len() == self.inner.capacity {
                log.lines.pop_front();
            }
            let offset = log.size;
            log.size += line.len() as u64 + 1;
            log.lines.push_back((offset, line));
        }
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.read(n, 0).lines
    }

    /// Scope's contract: with `since_offset` 0, the last `lines` non-blank lines; with
    /// `since_offset` below the log's size, the non-blank lines that start at or after that byte
    /// (at most the last `lines`); at or past the size, none. `offset` is the size now.
    pub fn read(&self, lines: usize, since_offset: u64) -> TailPage {
        let log = self.inner.log.lock();
        let offset = log.size;
        if since_offset >= offset && since_offset > 0 {
            return TailPage {
                lines: Vec::new(),
                offset,
            };
        }
        // Lines are in offset order: the first one at or after `since_offset`, by binary search.
        let first = log.lines.partition_point(|(at, _)| *at < since_offset);
        let picked: Vec<&String> = log
            .lines
            .range(first..)
            .map(|(_, line)| line)
            .filter(|line| !line.trim().is_empty())
            .collect();
        let skip = picked.len().saturating_sub(lines);
        TailPage {
            lines: picked[skip..].iter().map(|l| (*l).clone()).collect(),
            offset,
        }
    }

    /// Every line pushed from now on.
    pub fn follow(&self) -> broadcast::Receiver<String> {
        self.inner.follow.subscribe()
    }

    /// A `tracing` layer that formats each event into this tail.
    pub fn layer(&self) -> LogTailLayer {
        LogTailLayer { tail: self.clone() }
    }
}

/// The `tracing` layer behind [`LogTail::layer`].
pub struct LogTailLayer {
    tail: LogTail,
}

impl<S: Subscriber> Layer<S> for LogTailLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut message = String::with_capacity(96);
        event.record(&mut MessageVisitor(&mut message));
        self.tail.push(format_line(
            chrono::Local::now(),
            meta.target(),
            *meta.level(),
            &message,
        ));
    }
}

/// One log line as Scope's log file has it: `<asctime> - <name> - <LEVEL> - <message>`.
pub fn format_line<Tz: chrono::TimeZone>(
    at: chrono::DateTime<Tz>,
    target: &str,
    level: Level,
    message: &str,
) -> String
where
    Tz::Offset: std::fmt::Display,
{
    let mut line = String::with_capacity(48 + target.len() + message.len());
    let _ = write!(
        line,
        "{} - {} - {} - {message}",
        asctime(at),
        logger_name(target),
        level_name(level)
    );
    line
}

/// Python `logging`'s default `asctime`: `2026-06-02 11:08:33,123` (local time, milliseconds).
pub fn asctime<Tz: chrono::TimeZone>(at: chrono::DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    at.format("%Y-%m-%d %H:%M:%S,%3f").to_string()
}

/// A `tracing` target as a Python logger name: `relay::client` is `relay.client`.
fn logger_name(target: &str) -> String {
    target.replace("::", ".")
}

/// Python `logging` level names, which the client's level parser expects.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "DEBUG",
    }
}

struct MessageVisitor<'a>(&'a mut String);

impl Visit for MessageVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={:?}", field.name(), value);
        }
    }
}

/// The level a forwarded log line carries, parsed the way the seed's client does.
pub fn parse_level(line: &str) -> Level {
    if line.contains(" - ERROR - ") {
        Level::ERROR
    } else if line.contains(" - WARNING - ") {
        Level::WARN
    } else if line.contains(" - DEBUG - ") {
        Level::DEBUG
    } else {
        Level::INFO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_in_order() {
        let tail = LogTail::new(3);
        for i in 0..5 {
            tail.push(format!("line {i}"));
        }
        assert_eq!(tail.tail(10), vec!["line 2", "line 3", "line 4"]);
        assert_eq!(tail.tail(1), vec!["line 4"]);
    }

    #[test]
    fn offsets_are_bytes_of_one_never_rotated_log() {
        let tail = LogTail::new(100);
        assert_eq!(
            tail.read(200, 0),
            TailPage {
                lines: vec![],
                offset: 0
            }
        );
        tail.push("héllo".into()); // 6 bytes + newline
        tail.push("a\nb".into()); // two lines of 1 byte
        tail.push("  ".into()); // blank: occupies bytes, never served
        let all = tail.read(200, 0);
        assert_eq!(all.lines, ["héllo", "a", "b"]);
        assert_eq!(all.offset, 7 + 2 + 2 + 3);
        // A poller passing back the offset sees only what is new, then nothing twice.
        assert!(tail.read(200, all.offset).lines.is_empty());
        tail.push("c".into());
        let next = tail.read(200, all.offset);
        assert_eq!(
            (next.lines.as_slice(), next.offset),
            (&["c".to_string()][..], all.offset + 2)
        );
        assert!(tail.read(200, next.offset).lines.is_empty());
        // From a line's start: that line and the later ones; `lines` keeps the last ones.
        assert_eq!(tail.read(200, 7).lines, ["a", "b", "c"]);
        assert_eq!(tail.read(2, 7).lines, ["b", "c"]);
        assert_eq!(tail.read(1, 0).lines, ["c"]);
        // Past the end (e.g. an offset from before a restart): none, and the size to go on from.
        assert_eq!(
            tail.read(200, 10_000),
            TailPage {
                lines: vec![],
                offset: next.offset
            }
        );
    }

    #[test]
    fn a_poller_never_sees_a_line_twice_nor_misses_one() {
        let tail = LogTail::new(DEFAULT_CAPACITY);
        let (mut seen, mut offset) = (Vec::new(), 0);
        for round in 0..50 {
            for i in 0..(round % 7) {
                tail.push(format!("r{round} l{i}"));
            }
            let page = tail.read(1000, offset);
            seen.extend(page.lines);
            offset = page.offset;
        }
        let want: Vec<String> = (0..50)
            .flat_map(|r| (0..(r % 7)).map(move |i| format!("r{r} l{i}")))
            .collect();
        // The first poll (offset 0) reads the last lines, which are all of them here.
        assert_eq!(seen, want);
    }

    #[test]
    fn parses_python_logging_levels() {
        assert_eq!(parse_level("t - x - ERROR - boom"), Level::ERROR);
        assert_eq!(parse_level("t - x - WARNING - hm"), Level::WARN);
        assert_eq!(parse_level("t - x - DEBUG - d"), Level::DEBUG);
        assert_eq!(parse_level("plain"), Level::INFO);
    }

    #[test]
    fn layer_formats_events_like_python_logging() {
        use tracing_subscriber::layer::SubscriberExt;
        let tail = LogTail::new(10);
        let subscriber = tracing_subscriber::registry().with(tail.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "relay::test", count = 3, "disk is slow");
        });
        let lines = tail.tail(10);
        assert_eq!(lines.len(), 1);
        // `YYYY-MM-DD HH:MM:SS,mmm - relay.test - WARNING - disk is slow count=3`
        let (time, rest) = lines[0].split_at(23);
        assert_eq!(rest, " - relay.test - WARNING - disk is slow count=3");
        let shape: String = time
            .chars()
            .map(|c| if c.is_ascii_digit() { 'd' } else { c })
            .collect();
        assert_eq!(shape, "dddd-dd-dd dd:dd:dd,ddd", "{}", lines[0]);
    }

    /// The same instant, name, level and message formatted by Python's `logging` with Scope's
    /// format string and by [`format_line`]: identical lines (local time zone on both sides).
    #[test]
    fn lines_are_byte_identical_to_python_logging_with_scopes_format() {
        let cases = [
            (
                1_780_398_513_123_i64,
                "relay::client",
                Level::INFO,
                "Runner ready",
            ),
            (
                1_780_398_513_007,
                "relay",
                Level::WARN,
                "disk is slow count=3",
            ),
            (
                1_700_000_000_999,
                "telemetry",
                Level::ERROR,
                "boom: ünïcode",
            ),
            (1_700_000_000_000, "x::y::z", Level::DEBUG, "d"),
        ];
        let script = r#"
import json, logging, sys
fmt = logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s")
for ms, name, level, msg in json.load(sys.stdin):
    record = logging.LogRecord(name, getattr(logging, level), "f.py", 1, msg, None, None)
    record.created = ms / 1000
    record.msecs = ms % 1000
    print(fmt.format(record))
"#;
        let input: Vec<(i64, String, &str, &str)> = cases
            .iter()
            .map(|(ms, target, level, msg)| (*ms, logger_name(target), level_name(*level), *msg))
            .collect();
        let mut child = match std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => panic!("python3 (the system Python the project requires) did not start: {e}"),
        };
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(serde_json::to_string(&input).unwrap().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "python3 failed");
        let python: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let ours: Vec<String> = cases
            .iter()
            .map(|(ms, target, level, msg)| {
                let at = chrono::DateTime::from_timestamp_millis(*ms)
                    .unwrap()
                    .with_timezone(&chrono::Local);
                format_line(at, target, *level, msg)
            })
            .collect();
        assert_eq!(ours, python);
    }
}
