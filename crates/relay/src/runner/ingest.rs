//! The loopback ingest endpoint: the runner as a sidecar for a runner written in any language.
//!
//! `POST /v1/events` takes a JSON object or JSON lines, each one of:
//! - a built envelope (`{"id":..., "type":"stream_trace", "timestamp":..., "data":{...}}`), relayed
//!   verbatim (`publish_raw_event`): the sidecar never re-stamps what a process built;
//! - a `publish_event` request (`{"event_type": "...", "session_id"?, "connection_id"?,
//!   "pipeline_ids"?, "user_id"?, "error"?, "connection_info"?, "metadata"?: {...}}`), stamped here.
//!
//! The answer is `202 {"accepted": n, "rejected": m, "discarded": d, "errors": [...]}`: a bad line
//! is reported and skipped, never fatal to the rest of the body. With telemetry opted out
//! (`SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK`), valid lines are still checked but discarded,
//! never published, and counted in `discarded`.
//!
//! `POST /v1/notifications` takes one JSON object and forwards it to the client as a
//! `{"type":"notification","payload":...}` message, which the client re-broadcasts locally. It binds loopback addresses only: the endpoint
//! trusts its callers, so it must not be reachable from the network.

use anyhow::{bail, Context as _};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use telemetry::{ErrorInfo, Fields, RawEnvelope};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trickle::jsonl::JsonlWriter;

/// The largest request body accepted (the seed's per-event limit).
pub const MAX_BODY_BYTES: usize = 5 * 1024 * 1024;

/// Starts the endpoint on `addr` (a loopback address); the task ends when `stop` fires.
pub async fn serve(
    addr: SocketAddr,
    events: JsonlWriter,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    if !addr.ip().is_loopback() {
        bail!("the ingest endpoint trusts its callers, so it only binds loopback addresses; use 127.0.0.1:PORT instead of {addr}");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for ingest on {addr}"))?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "ingest endpoint listening");
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, router(events))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "ingest endpoint stopped");
        }
    }))
}

/// The endpoint's routes: `POST /v1/events`, `POST /v1/notifications` and `GET /health`.
pub fn router(events: JsonlWriter) -> Router {
    Router::new()
        .route("/v1/events", post(ingest))
        .route("/v1/notifications", post(notify))
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(events)
}

async fn notify(State(events): State<JsonlWriter>, body: Bytes) -> (StatusCode, Json<Value>) {
    let payload: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("a notification is one JSON object: {e}")})),
            )
        }
    };
    let line = json!({"type": "notification", "payload": payload}).to_string();
    // Never waits: while the trickle server is unreachable the writer's queue may be full.
    match events.try_write_line(Bytes::from(line)) {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({"accepted": 1}))),
        Err(trickle::jsonl::JsonlError::Full) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"error": "the events channel is backed up (is the trickle server reachable?); retry later"}),
            ),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("the events channel is not writable: {e}")})),
        ),
    }
}

async fn ingest(body: Bytes) -> (StatusCode, Json<Value>) {
    // Off the async workers: a big body is a burst, and the sink's drain task must keep running
    // beside it rather than wait in this worker's queue until the burst is over.
    let outcome = match tokio::task::spawn_blocking(move || ingest_body(&body)).await {
        Ok(outcome) => outcome,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": format!("ingest failed: {e}")})),
            )
        }
    };
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "accepted": outcome.accepted,
            "rejected": outcome.errors.len(),
            "discarded": outcome.discarded,
            "errors": outcome.errors,
        })),
    )
}

/// What one ingest body produced.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Events handed to the sink.
    pub accepted: usize,
    /// Valid events discarded because telemetry is opted out.
    pub discarded: usize,
    /// One message per rejected line (`line N: why`).
    pub errors: Vec<String>,
}

/// Publishes every valid line of `body`; the plain function behind the handler.
pub fn ingest_body(body: &[u8]) -> Outcome {
    let mut outcome = Outcome::default();
    let enabled = telemetry::telemetry_enabled();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match ingest_line(line, enabled) {
            Ok(()) if enabled => outcome.accepted += 1,
            Ok(()) => outcome.discarded += 1,
            Err(e) => outcome.errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    outcome
}

/// Checks one line and, when `publish` (telemetry is on), hands it to the sink.
fn ingest_line(line: &[u8], publish: bool) -> Result<(), String> {
    let value: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    if value.contains_key("id") && value.contains_key("data") {
        let raw = RawEnvelope::parse(Bytes::copy_from_slice(line)).map_err(|e| e.to_string())?;
        if publish {
            telemetry::publish_raw_event(raw);
        }
        return Ok(());
    }
    let request: EventRequest = serde_json::from_value(Value::Object(value))
        .map_err(|e| format!("neither an envelope nor a publish_event request: {e}"))?;
    if publish {
        let event_type = request.event_type.clone();
        telemetry::publish_event(&event_type, request.into_fields());
    }
    Ok(())
}

/// A `publish_event` request from a local process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    event_type: String,
    session_id: Option<String>,
    connection_id: Option<String>,
    #[serde(default)]
    pipeline_ids: Vec<String>,
    user_id: Option<String>,
    error: Option<ErrorRequest>,
    connection_info: Option<Value>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct ErrorRequest {
    error_type: String,
    message: String,
    #[serde(default)]
    exception_type: String,
    #[serde(default)]
    recoverable: bool,
}

impl EventRequest {
    fn into_fields(self) -> Fields {
        let mut fields = Fields::new().pipeline_ids(self.pipeline_ids);
        if let Some(id) = self.session_id {
            fields = fields.session_id(id);
        }
        if let Some(id) = self.connection_id {
            fields = fields.connection_id(id);
        }
        if let Some(id) = self.user_id {
            fields = fields.user_id(id);
        }
        if let Some(e) = self.error {
            fields = fields.error(ErrorInfo::new(
                e.error_type,
                e.message,
                e.exception_type,
                e.recoverable,
            ));
        }
        if let Some(info) = self.connection_info {
            fields = fields.connection_info(info);
        }
        for (key, value) in self.metadata {
            fields = fields.meta(key, value);
        }
        fields
    }
}
