//! Priority classes: which events a full queue gives up first.
//!
//! The rule, applied to `data.type`:
//! - [`Priority::Low`]: periodic, metric-like events whose next sample supersedes the lost one:
//!   `stream_heartbeat`, and any type that ends in `_heartbeat`, `_metrics` or `_stats`, or starts
//!   with `metrics_`.
//! - [`Priority::High`]: everything else: lifecycle (`session_*`, `stream_*`, `pipeline_*`,
//!   `playback_ready`), `error`, `runner_ready`, media loop failures, `telemetry_dropped`, and any
//!   unknown type (a lost one-off event cannot be re-sent, so the default is to keep it).

use serde::Serialize;

/// How hard a bounded queue tries to keep an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// One-off events (lifecycle, errors, loss reports): never dropped to make room for `Low`.
    High,
    /// Periodic samples (heartbeats, metrics): dropped first, oldest first.
    Low,
}

impl Priority {
    /// The class of an event by its `data.type` (see the module docs for the rule).
    pub fn of(event_type: &str) -> Priority {
        if event_type == "stream_heartbeat"
            || event_type.ends_with("_heartbeat")
            || event_type.ends_with("_metrics")
            || event_type.ends_with("_stats")
            || event_type.starts_with("metrics_")
        {
            Priority::Low
        } else {
            Priority::High
        }
    }

    /// The class of an event whose type is unknown or missing: `High` (keep what cannot be re-sent).
    pub fn of_opt(event_type: Option<&str>) -> Priority {
        event_type.map_or(Priority::High, Priority::of)
    }

    /// `"high"` or `"low"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Low => "low",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_event_types_classify_as_documented() {
        for t in [
            "session_created",
            "session_closed",
            "stream_started",
            "stream_stopped",
            "playback_ready",
            "pipeline_load_start",
            "pipeline_loaded",
            "pipeline_unloaded",
            "error",
            "runner_ready",
            "media_input_loop_failed",
            "media_output_loop_failed",
            "media_audio_output_loop_failed",
            "telemetry_dropped",
            "something_new",
        ] {
            assert_eq!(Priority::of(t), Priority::High, "{t}");
        }
        for t in [
            "stream_heartbeat",
            "gpu_heartbeat",
            "pipeline_metrics",
            "encoder_stats",
            "metrics_fps",
        ] {
            assert_eq!(Priority::of(t), Priority::Low, "{t}");
        }
        assert_eq!(Priority::of_opt(None), Priority::High);
    }
}
