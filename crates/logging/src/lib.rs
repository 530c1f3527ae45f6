//! How every `trickle-relay` process writes its log to stderr: text for eyes, JSON lines for log
//! shippers, and colour only where a person is looking.
//!
//! **Two formats** ([`LogFormat`], the CLI's `--log-format`, env `TRICKLE_RELAY_LOG_FORMAT`):
//! - `text` (the default): `tracing`'s usual line, `2026-06-02T11:08:33.123456Z  INFO target: message key=value`;
//! - `json`: one JSON object per line, `{"timestamp":"2026-06-02T11:08:33.123456Z","level":"INFO",
//!   "message":"...","key":"value",...,"target":"relay::client"}`: the event's fields flattened
//!   beside `message` (tracing-subscriber's JSON formatter with `flatten_event`). The log sink's
//!   `TELEMETRY type=... id=...` line is its `message`, byte for byte.
//!
//! **Colour.** ANSI escape codes are written only when stderr is a terminal and `NO_COLOR` is
//! unset or empty (<https://no-color.org>): `trickle-relay demo > out.txt 2>&1` gives plain text.
//!
//! **Console lines.** A command also says things outside the log: where it listens, its final
//! summary, the error it exits with. They go through [`say!`] / [`console`] / [`console_error`],
//! which print them as they always were in `text`, and as the same JSON object as a log line in
//! `json` (level `INFO` / `ERROR`, target `trickle_relay`), so every stderr line of a JSON run
//! parses. Each line is written whole with one `write` under stderr's lock.
//!
//! ```no_run
//! logging::init("info", logging::LogFormat::Json, None::<logging::NoLayer>);
//! tracing::info!(port = 2939, "listening");
//! logging::say!("demo: {} events relayed", 42);
//! ```

use std::fmt;
use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The target of console lines in `json` (they are the `trickle-relay` command's own words).
pub const CONSOLE_TARGET: &str = "trickle_relay";

/// The environment variable behind `--log-format`.
pub const FORMAT_ENV: &str = "TRICKLE_RELAY_LOG_FORMAT";

/// How log lines (and console lines) are written on stderr.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message, the event's fields, target.
    Json,
}

const TEXT: u8 = 0;
const JSON: u8 = 1;
static FORMAT: AtomicU8 = AtomicU8::new(TEXT);

/// The format [`init`] chose (`text` before it ran).
pub fn format() -> LogFormat {
    match FORMAT.load(Ordering::Relaxed) {
        JSON => LogFormat::Json,
        _ => LogFormat::Text,
    }
}

/// Whether stderr gets ANSI colour: it is a terminal and `NO_COLOR` is unset or empty.
pub fn stderr_wants_colour() -> bool {
    colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// The rule behind [`stderr_wants_colour`], for a given terminal check and `NO_COLOR` value.
pub fn colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A placeholder type for `init(.., None::<NoLayer>)`: no extra layer.
pub type NoLayer = tracing_subscriber::layer::Identity;

/// Installs the process's `tracing` subscriber: `filter` (an `EnvFilter` directive; a bad one
/// falls back to `info` with a warning), stderr in `format`, and `extra` (e.g. the log tail) fed
/// every event that passes the filter. Call once, first thing in `main`.
pub fn init<L>(filter: &str, format: LogFormat, extra: Option<L>)
where
    L: Layer<Registry> + Send + Sync + 'static,
{
    FORMAT.store(
        match format {
            LogFormat::Text => TEXT,
            LogFormat::Json => JSON,
        },
        Ordering::Relaxed,
    );
    let (filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let stderr = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(stderr_wants_colour())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // `extra` first: it is the layer typed on `Registry`; the boxed stderr layer sits on top.
    tracing_subscriber::registry()
        .with(extra)
        .with(stderr)
        .with(filter)
        .init();
    if let Some(e) = bad {
        tracing::warn!(error = %e, "bad --log / RUST_LOG filter; using `info`");
    }
}

/// Prints one console line (see the module docs): as is in `text`, a JSON `INFO` line in `json`.
/// Blank lines (spacing in a text summary) are left out of `json`.
pub fn console(args: fmt::Arguments<'_>) {
    write_console("INFO", args);
}

/// Prints the error a command exits with: `error: ...` in `text`, a JSON `ERROR` line in `json`.
pub fn console_error(args: fmt::Arguments<'_>) {
    match format() {
        LogFormat::Text => write_stderr(format!("error: {args}\n")),
        LogFormat::Json => write_console("ERROR", args),
    }
}

/// `eprintln!` for a command's console lines, in the process's log format ([`console`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console(::std::format_args!($($arg)*))
    };
}

fn write_console(level: &str, args: fmt::Arguments<'_>) {
    match format() {
        LogFormat::Text => write_stderr(format!("{args}\n")),
        LogFormat::Json => {
            let message = args.to_string();
            if message.trim().is_empty() {
                return;
            }
            write_stderr(json_line(level, &message, chrono::Utc::now()));
        }
    }
}

/// A console line as the JSON formatter writes a log line: the same keys, in the same order.
pub fn json_line(level: &str, message: &str, at: chrono::DateTime<chrono::Utc>) -> String {
    // Keys in the JSON formatter's order (a `json!` map would sort them).
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let mut line = format!(
        "{{\"timestamp\":{},\"level\":{},\"message\":{},\"target\":{}}}",
        quoted(&at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        quoted(level),
        quoted(message),
        quoted(CONSOLE_TARGET),
    );
    line.push('\n');
    line
}

fn write_stderr(line: String) {
    // Nothing sensible is left to do when stderr itself is gone.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None), "a file or a pipe never gets escapes");
    }

    #[test]
    fn console_json_lines_have_the_log_lines_keys() {
        let at = chrono::DateTime::from_timestamp_millis(1_780_398_513_123).unwrap();
        let line = json_line("INFO", "demo: \"quoted\"\tand tabbed", at);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["timestamp"], "2026-06-02T11:08:33.123000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "demo: \"quoted\"\tand tabbed");
        assert_eq!(v["target"], CONSOLE_TARGET);
        let keys: Vec<&str> = line
            .split("\":")
            .map(|k| k.rsplit('"').next().unwrap())
            .collect();
        assert_eq!(
            keys[..4],
            ["timestamp", "level", "message", "target"],
            "{line}"
        );
    }
}
