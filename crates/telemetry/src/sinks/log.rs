//! [`LogSink`]: one line per event, for checking a relay without a broker.
//!
//! The line is exactly
//! `TELEMETRY type=<data.type> id=<id> session=<data.session_id> connection=<data.connection_id> relayed_via=<data.relayed_via>`,
//! logged with `tracing::info!(target: "telemetry")`. A missing value is written `-`.
//!
//! The line is formatted and handed to the installed `tracing` subscriber on the caller's thread,
//! so its cost is the subscriber's; give the subscriber a non-blocking writer where stderr may
//! stall. It is the client's egress for eyeballing a relay, not for the media path.

use crate::envelope::Event;
use crate::sink::{Sink, SinkStats};
use std::sync::atomic::{AtomicU64, Ordering};

/// Logs each event as one `TELEMETRY ...` line.
#[derive(Debug, Default)]
pub struct LogSink {
    emitted: AtomicU64,
}

impl LogSink {
    /// A log sink.
    pub fn new() -> Self {
        LogSink::default()
    }

    /// The exact line logged for `event`.
    pub fn format_line(event: &Event) -> String {
        let dash = |v: Option<&str>| v.filter(|s| !s.is_empty()).unwrap_or("-").to_owned();
        format!(
            "TELEMETRY type={} id={} session={} connection={} relayed_via={}",
            dash(event.event_type()),
            event.id(),
            dash(event.session_id()),
            dash(event.connection_id()),
            dash(event.relayed_via()),
        )
    }
}

impl Sink for LogSink {
    fn emit(&self, event: Event) {
        self.emitted.fetch_add(1, Ordering::Relaxed);
        let line = LogSink::format_line(&event);
        tracing::info!(target: "telemetry", "{line}");
    }

    fn stats(&self) -> SinkStats {
        let n = self.emitted.load(Ordering::Relaxed);
        SinkStats {
            emitted: n,
            delivered: n,
            ..SinkStats::default()
        }
    }

    fn name(&self) -> &'static str {
        "log"
    }
}
