//! A ring buffer of this process's recent log lines, fed by a `tracing` layer.
//!
//! The client serves it as the seed's `GET /api/v1/logs/tail`; the runner subscribes to it to
//! forward its own log lines to the client in `logs` batches. Lines are formatted the way Python's
//! `logging` does (`<time> - <target> - <LEVEL> - <message>`), because the client parses the
//! level out of exactly that shape (see `shared/spec/telemetry.md`).

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// How many lines the tail keeps by default.
pub const DEFAULT_CAPACITY: usize = 1000;

/// Recent log lines of this process, shared between the logging layer and its readers.
#[derive(Clone)]
pub struct LogTail {
    inner: Arc<Inner>,
}

struct Inner {
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
    // Followers (the runner's log forwarder) get every new line; lagging ones lose lines, never block.
    follow: broadcast::Sender<String>,
}

impl LogTail {
    /// A tail keeping the last `capacity` lines.
    pub fn new(capacity: usize) -> LogTail {
        let (follow, _) = broadcast::channel(4096);
        LogTail {
            inner: Arc::new(Inner {
                lines: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
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

    /// Appends one formatted line.
    pub fn push(&self, line: String) {
        // A send error only means nobody follows right now.
        let _ = self.inner.follow.send(line.clone());
        let mut lines = self.inner.lines.lock();
        if lines.len() == self.inner.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.inner.lines.lock();
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).cloned().collect()
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
        let mut line = String::with_capacity(128);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let _ = write!(
            line,
            "{}.{:03} - {} - {} - ",
            now.as_secs(),
            now.subsec_millis(),
            meta.target(),
            level_name(*meta.level())
        );
        event.record(&mut MessageVisitor(&mut line));
        self.tail.push(line);
    }
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
        assert!(
            lines[0].contains(" - relay::test - WARNING - disk is slow count=3"),
            "{}",
            lines[0]
        );
    }
}
