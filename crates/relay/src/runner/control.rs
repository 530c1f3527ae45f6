//! The runner's answers to control messages, in the shapes Scope's runner (`livepeer_app.py`)
//! sends, so a Scope client can drive this runner unchanged.
//!
//! Every control message is answered, `request_id` echoed as received (`null` when absent, as the
//! Python runner writes it):
//!
//! | message | answer |
//! | --- | --- |
//! | `ping {timestamp}` | `pong {request_id, timestamp}` (the ping's timestamp, echoed) |
//! | `start_stream {params}` | `stream_started {request_id, channels: [in, out]}` ([`super::media`]); a stream already running: `stream_started {request_id, status: "already_running"}`; params not an object, or channels that cannot be created: `error` |
//! | `stop_stream` | `stream_stopped {request_id}` (also with no stream running) |
//! | `parameters {params}` | `parameters_ack {request_id, status: "ok"}`; params not an object: `error "parameters params must be an object"`; no stream: `error "No active stream"` |
//! | `api {method, path, body?}` | `api_response {request_id, status, data}` (on failure `error` instead of `data`) |
//! | any other `type` | `error {request_id, error: "Unknown message type: <type>"}` |
//!
//! A message of a known type whose fields have the wrong shape is answered `error` too, so no
//! caller waits for its timeout.
//!
//! One message is ours, not Scope's: `telemetry_flow {read_seq, end?}`, our client's report of the
//! last event line it read (flow control, see [`telemetry::flow`]) and its request to end the
//! session. It is read by the runner loop ([`flow_report`]), not answered (a `request_id`, which
//! our client never sends, is answered `telemetry_flow {request_id, last_seq}`). Scope's runner
//! answers it `error`, as any unknown type, and our client then stops sending it.

use super::media::{MediaOptions, MediaStats, MediaStream};
use super::pipeline::{Emit, Pipeline};
use super::vram::Vram;
use crate::SessionIds;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;
use telemetry::Sink;

/// What the control loop acts on: the session, the simulated pipeline and the stream's media.
pub struct StreamState {
    /// The session's ids (adopted from `start_stream` params where the runner was not given them).
    pub session: SessionIds,
    /// The simulated pipeline.
    pub pipeline: Pipeline,
    /// GPU memory, when a GPU is present.
    pub vram: Option<Vram>,
    /// Where and how media channels are made.
    pub media_options: MediaOptions,
    /// The running stream's media, if a stream runs.
    pub media: Option<MediaStream>,
    /// Media loop counters of the streams already stopped.
    pub media_done: MediaStats,
    /// Where the session's telemetry goes: the runner's own sink.
    pub sink: Arc<dyn Sink>,
}

impl StreamState {
    /// Whether a stream runs.
    pub fn is_streaming(&self) -> bool {
        self.pipeline.is_streaming()
    }

    /// Media loop counters over every stream of this runner.
    pub fn media_stats(&self) -> MediaStats {
        let now = self
            .media
            .as_ref()
            .map(MediaStream::stats)
            .unwrap_or_default();
        MediaStats {
            segments: self.media_done.segments + now.segments,
            bytes: self.media_done.bytes + now.bytes,
            failures: self.media_done.failures + now.failures,
        }
    }

    /// Publishes `emit` for this session (and the pipeline, when `with_pipeline`).
    pub fn publish(&self, with_pipeline: bool, emit: Emit) {
        super::publish(
            &self.sink,
            &self.session,
            with_pipeline.then(|| self.pipeline.id()),
            emit,
        );
    }

    /// One heartbeat, if a stream runs.
    pub fn heartbeat(&mut self) {
        let vram = self.vram.as_ref().and_then(Vram::read);
        if let Some(emit) = self.pipeline.heartbeat(Instant::now(), vram) {
            self.publish(true, emit);
        }
    }

    /// Stops the stream, if one runs: its lifecycle events, its media (channels deleted) and
    /// `session_closed`, which pairs with the `session_created` of its start.
    pub async fn stop_stream(&mut self) {
        for emit in self.pipeline.stop(Instant::now()) {
            self.publish(true, emit);
        }
        if let Some(media) = self.media.take() {
            let stats = media.stop().await;
            self.media_done.segments += stats.segments;
            self.media_done.bytes += stats.bytes;
            self.media_done.failures += stats.failures;
            self.publish(false, Emit::new("session_closed"));
        }
    }
}

/// Answers one control message (a JSON object) and acts on it.
pub async fn answer(msg: Map<String, Value>, state: &mut StreamState) -> Value {
    let request_id = msg.get("request_id").cloned().unwrap_or(Value::Null);
    let error = |text: String| json!({"type": "error", "request_id": request_id, "error": text});
    let kind = msg.get("type").and_then(Value::as_str).unwrap_or_default();
    match kind {
        "ping" => json!({
            "type": "pong",
            "request_id": request_id,
            "timestamp": msg.get("timestamp").cloned().unwrap_or(Value::Null),
        }),
        "api" => api(&msg, &request_id, state),
        "start_stream" => {
            let params = match object_param(&msg) {
                Some(p) => p,
                None => return error("start_stream params must be an object".into()),
            };
            if state.is_streaming() {
                tracing::info!("start_stream ignored: stream already running");
                return json!({"type": "stream_started", "request_id": request_id, "status": "already_running"});
            }
            match start_stream(&params, state).await {
                Ok(channels) => {
                    json!({"type": "stream_started", "request_id": request_id, "channels": channels})
                }
                Err(e) => error(format!("{e:#}")),
            }
        }
        "stop_stream" => {
            state.stop_stream().await;
            tracing::info!("Stopped stream");
            json!({"type": "stream_stopped", "request_id": request_id})
        }
        "parameters" => {
            let Some(params) = object_param(&msg) else {
                return error("parameters params must be an object".into());
            };
            if !state.is_streaming() {
                return error("No active stream".into());
            }
            // The simulated pipeline fails on demand, so the error path can be exercised end to end.
            if let Some(message) = params.get("inject_error").and_then(Value::as_str) {
                let media_loop = params.get("media_loop").and_then(Value::as_str);
                for emit in state.pipeline.fail(message, media_loop) {
                    state.publish(true, emit);
                }
            }
            json!({"type": "parameters_ack", "request_id": request_id, "status": "ok"})
        }
        _ => {
            let shown = type_for_message(msg.get("type"));
            tracing::warn!("Unknown control message type: {shown}");
            error(format!("Unknown message type: {shown}"))
        }
    }
}

/// A `telemetry_flow` report from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowReport {
    /// The last event `seq` the client read.
    pub read_seq: Option<u64>,
    /// The client asks to end the session (it reads on until the channel ends).
    pub end: bool,
    /// Present only if the sender wants an answer.
    pub request_id: Option<Value>,
}

/// The message as a [`FlowReport`], when it is a `telemetry_flow`.
pub fn flow_report(msg: &Map<String, Value>) -> Option<FlowReport> {
    if msg.get("type").and_then(Value::as_str) != Some("telemetry_flow") {
        return None;
    }
    Some(FlowReport {
        read_seq: msg.get("read_seq").and_then(Value::as_u64),
        end: msg.get("end").and_then(Value::as_bool).unwrap_or(false),
        request_id: msg.get("request_id").filter(|v| !v.is_null()).cloned(),
    })
}

/// `params` as an object: absent, null or empty counts as `{}` (Python's `or {}`); another
/// value is `None`.
fn object_param(msg: &Map<String, Value>) -> Option<Map<String, Value>> {
    match msg.get("params") {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(m)) => Some(m.clone()),
        Some(Value::Bool(false)) => Some(Map::new()),
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Some(Map::new()),
        Some(Value::String(s)) if s.is_empty() => Some(Map::new()),
        Some(Value::Array(a)) if a.is_empty() => Some(Map::new()),
        Some(_) => None,
    }
}

/// The message `type` as the Python runner prints it in `Unknown message type: {type}`.
fn type_for_message(t: Option<&Value>) -> String {
    match t {
        None | Some(Value::Null) => "None".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "True".into(),
        Some(Value::Bool(false)) => "False".into(),
        Some(other) => other.to_string(),
    }
}

/// Starts the stream: media channels, `session_created`, the pipeline's lifecycle events.
async fn start_stream(
    params: &Map<String, Value>,
    state: &mut StreamState,
) -> anyhow::Result<Value> {
    adopt_session(&mut state.session, params);
    let on_failure: super::media::FailureSink = {
        let session = state.session.clone();
        let pipeline_id = state.pipeline.id().to_string();
        let sink = state.sink.clone();
        Arc::new(move |emit| super::publish(&sink, &session, Some(&pipeline_id), emit))
    };
    let media = MediaStream::start(&state.media_options, on_failure).await?;
    let channels = media.channels_json();
    state.media = Some(media);
    state.publish(
        true,
        Emit::new("session_created").with("mode", json!("livepeer")),
    );
    for emit in state.pipeline.start(Instant::now()) {
        state.publish(true, emit);
    }
    tracing::info!(
        "Started stream with pipeline_ids=['{}'] inputs=1 outputs=1 audio=False",
        state.pipeline.id()
    );
    Ok(channels)
}

/// Takes the session's ids from `start_stream` params where the runner was not given them.
fn adopt_session(session: &mut SessionIds, params: &Map<String, Value>) {
    let take = |key: &str| params.get(key).and_then(Value::as_str).map(str::to_string);
    if session.session_id.is_none() {
        session.session_id = take("session_id");
    }
    if session.connection_id.is_none() {
        session.connection_id = take("connection_id");
    }
}

/// The simulated app's HTTP API, reached through `api` control messages; answered as Scope's
/// runner answers from its embedded FastAPI app.
fn api(msg: &Map<String, Value>, request_id: &Value, state: &StreamState) -> Value {
    let method = match msg.get("method") {
        None | Some(Value::Null) => "GET".to_string(),
        Some(Value::String(s)) => s.to_uppercase(),
        Some(other) => other.to_string().to_uppercase(),
    };
    let path = msg.get("path").and_then(Value::as_str).unwrap_or_default();
    let route = path.split(['?', '#']).next().unwrap_or_default();
    let route = match route.trim_end_matches('/') {
        "" => "/",
        r => r,
    };
    let answer = |status: u16, data: Value| json!({"type": "api_response", "request_id": request_id, "status": status, "data": data});
    if !matches!(method.as_str(), "GET" | "POST" | "PATCH" | "DELETE") {
        return json!({"type": "api_response", "request_id": request_id, "status": 400,
            "error": format!("Unsupported method: {method}")});
    }
    match (method.as_str(), route) {
        ("GET", "/health") => answer(200, json!({"status": "healthy"})),
        ("GET", "/api/v1/pipeline/status") => answer(
            200,
            json!({
                "status": if state.is_streaming() { "loaded" } else { "not_loaded" },
                "pipeline_id": state.pipeline.id(),
                "pipeline_ids": [state.pipeline.id()],
                "streaming": state.is_streaming(),
            }),
        ),
        (_, "/health" | "/api/v1/pipeline/status") => {
            answer(405, json!({"detail": "Method Not Allowed"}))
        }
        _ => answer(404, json!({"detail": "Not Found"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_are_named_as_python_prints_them() {
        assert_eq!(type_for_message(Some(&json!("frobnicate"))), "frobnicate");
        assert_eq!(type_for_message(None), "None");
        assert_eq!(type_for_message(Some(&Value::Null)), "None");
        assert_eq!(type_for_message(Some(&json!(5))), "5");
        assert_eq!(type_for_message(Some(&json!(true))), "True");
    }

    #[test]
    fn params_follow_pythons_or_empty() {
        let msg = |p: Value| json!({"params": p}).as_object().unwrap().clone();
        assert_eq!(object_param(&Map::new()), Some(Map::new()));
        assert_eq!(object_param(&msg(Value::Null)), Some(Map::new()));
        assert_eq!(object_param(&msg(json!(""))), Some(Map::new()));
        assert!(object_param(&msg(json!({"a": 1}))).is_some());
        assert_eq!(object_param(&msg(json!("text"))), None);
        assert_eq!(object_param(&msg(json!([1]))), None);
        assert_eq!(object_param(&msg(json!(3))), None);
    }
}
