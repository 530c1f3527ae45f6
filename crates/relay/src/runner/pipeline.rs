//! The simulated video pipeline the runner drives.
//!
//! There is no GPU work in this project: the pipeline counts frames at a nominal rate so that the
//! runner's telemetry (lifecycle, `stream_heartbeat` with frame stats, errors, media loop
//! failures) has the shape and cadence of a real session. It is a plain state machine; the runner
//! turns its [`Emit`]s into envelopes.
//!
//! `stream_heartbeat` carries the seed's fields (Scope's `FrameProcessor`): `mode` (`"local"`, as
//! on a runner), `frames_in`, `frames_out`, `fps_in`, `fps_out`, `elapsed_ms` (all cumulative since
//! the stream started, rates rounded to one decimal), `since_last_heartbeat_ms`, `pipeline_fps`,
//! and `vram_allocated_mb` / `vram_reserved_mb` (MiB, one decimal) when a GPU is present.

use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use telemetry::ErrorInfo;

/// One event the pipeline wants published: its type, metadata, and an optional error.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit {
    /// The event type (`data.type` of the envelope).
    pub event_type: &'static str,
    /// Metadata merged into `data`.
    pub metadata: Map<String, Value>,
    /// The `error` object of an `error` event.
    pub error: Option<ErrorInfo>,
}

impl Emit {
    /// An event with no metadata.
    pub fn new(event_type: &'static str) -> Emit {
        Emit {
            event_type,
            metadata: Map::new(),
            error: None,
        }
    }

    /// Adds one metadata entry.
    pub fn with(mut self, key: &str, value: Value) -> Emit {
        self.metadata.insert(key.to_string(), value);
        self
    }
}

/// A simulated pipeline: idle, or streaming with frame counters.
#[derive(Debug)]
pub struct Pipeline {
    pipeline_id: String,
    nominal_fps: f64,
    stream: Option<Stream>,
}

#[derive(Debug)]
struct Stream {
    started: Instant,
    last_heartbeat: Instant,
    frames_in: u64,
    frames_out: u64,
}

impl Pipeline {
    /// An idle pipeline that will stream at `nominal_fps`.
    pub fn new(pipeline_id: impl Into<String>, nominal_fps: f64) -> Pipeline {
        Pipeline {
            pipeline_id: pipeline_id.into(),
            nominal_fps,
            stream: None,
        }
    }

    /// The pipeline id, for `data.pipeline_ids`.
    pub fn id(&self) -> &str {
        &self.pipeline_id
    }

    /// Whether a stream is running.
    pub fn is_streaming(&self) -> bool {
        self.stream.is_some()
    }

    /// Starts a stream: loads the pipeline and begins counting frames.
    pub fn start(&mut self, now: Instant) -> Vec<Emit> {
        if self.stream.is_some() {
            return Vec::new();
        }
        self.stream = Some(Stream {
            started: now,
            last_heartbeat: now,
            frames_in: 0,
            frames_out: 0,
        });
        vec![
            Emit::new("pipeline_load_start"),
            Emit::new("pipeline_loaded").with("load_ms", json!(0)),
            Emit::new("stream_started"),
            Emit::new("playback_ready"),
        ]
    }

    /// One heartbeat: advances the frame counters to `now` and reports them, cumulative since the
    /// stream started (as the seed's `FrameProcessor` does).
    ///
    /// `vram` is `(allocated_mb, reserved_mb)` when a GPU is present.
    pub fn heartbeat(&mut self, now: Instant, vram: Option<(f64, f64)>) -> Option<Emit> {
        let fps = self.nominal_fps;
        let s = self.stream.as_mut()?;
        let elapsed = now.duration_since(s.started);
        let since = now.duration_since(s.last_heartbeat);
        let frames = (elapsed.as_secs_f64() * fps) as u64;
        s.frames_in = frames;
        // The output lags the input by the frame in flight, as a real pipeline's does.
        s.frames_out = frames.saturating_sub(1);
        s.last_heartbeat = now;
        let mut emit = Emit::new("stream_heartbeat")
            .with("mode", json!("local"))
            .with("frames_in", json!(s.frames_in))
            .with("frames_out", json!(s.frames_out))
            .with("fps_in", json!(round1(rate(s.frames_in, elapsed))))
            .with("fps_out", json!(round1(rate(s.frames_out, elapsed))))
            .with("elapsed_ms", json!(elapsed.as_millis() as u64))
            .with("since_last_heartbeat_ms", json!(since.as_millis() as u64))
            .with("pipeline_fps", json!(round1(fps)));
        if let Some((allocated, reserved)) = vram {
            emit = emit
                .with("vram_allocated_mb", json!(round1(allocated)))
                .with("vram_reserved_mb", json!(round1(reserved)));
        }
        Some(emit)
    }

    /// A pipeline failure: an `error` event, plus the media loop failure it caused when `media_loop`
    /// names one (`input`, `output` or `audio_output`), reported as the seed does: another `error`
    /// event whose `error_type` is `media_<loop>_loop_failed`.
    pub fn fail(&mut self, message: &str, media_loop: Option<&str>) -> Vec<Emit> {
        let mut emits = vec![Emit {
            error: Some(ErrorInfo::new(
                "pipeline_error",
                message,
                "RuntimeError",
                true,
            )),
            ..Emit::new("error")
        }];
        let loop_event = match media_loop {
            Some("input") => Some("media_input_loop_failed"),
            Some("output") => Some("media_output_loop_failed"),
            Some("audio_output") => Some("media_audio_output_loop_failed"),
            _ => None,
        };
        if let Some(error_type) = loop_event {
            emits.push(super::media::media_loop_error(
                error_type,
                message,
                "RuntimeError",
            ));
        }
        emits
    }

    /// Stops the stream and unloads the pipeline.
    pub fn stop(&mut self, now: Instant) -> Vec<Emit> {
        let Some(s) = self.stream.take() else {
            return Vec::new();
        };
        vec![
            Emit::new("stream_stopped")
                .with("frames_out", json!(s.frames_out))
                .with(
                    "elapsed_ms",
                    json!(now.duration_since(s.started).as_millis() as u64),
                ),
            Emit::new("pipeline_unloaded"),
        ]
    }
}

fn rate(frames: u64, over: Duration) -> f64 {
    let secs = over.as_secs_f64();
    if secs > 0.0 {
        frames as f64 / secs
    } else {
        0.0
    }
}

/// Python's `round(x, 1)`, as the seed rounds its rates.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_emits_lifecycle_heartbeats_and_errors() {
        let t0 = Instant::now();
        let mut p = Pipeline::new("passthrough", 30.0);
        assert!(p.heartbeat(t0, None).is_none(), "no heartbeat while idle");
        let types: Vec<_> = p.start(t0).iter().map(|e| e.event_type).collect();
        assert_eq!(
            types,
            [
                "pipeline_load_start",
                "pipeline_loaded",
                "stream_started",
                "playback_ready"
            ]
        );
        let hb = p
            .heartbeat(t0 + Duration::from_secs(2), Some((812.54, 1024.0)))
            .unwrap();
        assert_eq!(hb.metadata["mode"], json!("local"));
        assert_eq!(hb.metadata["frames_in"], json!(60));
        assert_eq!(hb.metadata["frames_out"], json!(59));
        assert_eq!(hb.metadata["fps_in"], json!(30.0));
        assert_eq!(hb.metadata["fps_out"], json!(29.5));
        assert_eq!(hb.metadata["vram_allocated_mb"], json!(812.5));
        let hb = p.heartbeat(t0 + Duration::from_secs(3), None).unwrap();
        assert!(!hb.metadata.contains_key("vram_allocated_mb"));
        assert_eq!(hb.metadata["since_last_heartbeat_ms"], json!(1000));
        // Cumulative since the start, not over the last window.
        assert_eq!(hb.metadata["frames_out"], json!(89));
        assert_eq!(hb.metadata["elapsed_ms"], json!(3000));
        assert_eq!(hb.metadata["fps_out"], json!(29.7));
        let fail = p.fail("boom", Some("output"));
        assert_eq!(fail[0].event_type, "error");
        assert_eq!(fail[1].event_type, "error");
        let loop_error = fail[1].error.as_ref().unwrap();
        assert_eq!(loop_error.error_type, "media_output_loop_failed");
        assert!(!loop_error.recoverable);
        assert_eq!(fail[1].metadata["mode"], json!("livepeer"));
        let types: Vec<_> = p
            .stop(t0 + Duration::from_secs(4))
            .iter()
            .map(|e| e.event_type)
            .collect();
        assert_eq!(types, ["stream_stopped", "pipeline_unloaded"]);
        assert!(p.stop(t0).is_empty(), "stopping twice emits nothing");
    }
}
