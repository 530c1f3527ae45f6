//! The sinks, one per file. Each implements [`crate::Sink`]: `emit` never blocks, never fails.
//!
//! - [`LogSink`]: one `TELEMETRY ...` log line per event (egress for checking a relay by eye).
//! - [`FileSink`]: each event's exact JSON bytes plus `\n`, appended to a file by a background thread.
//! - [`TrickleEventsSink`]: the runner's sink; writes numbered `{"type":"telemetry","seq":N,"event":...}`
//!   lines to the session's events channel, with loss reports, held to the client's flow budget.
//! - [`MemorySink`]: keeps events in memory (tests, embedding).

mod file;
mod log;
mod memory;
mod trickle_events;

pub use file::{FileSink, DEFAULT_FILE_CAPACITY};
pub use log::LogSink;
pub use memory::MemorySink;
pub use trickle_events::{
    NoRuntime, SessionContext, TransitTotals, TrickleEventsConfig, TrickleEventsSink, SINK_NAME,
};
