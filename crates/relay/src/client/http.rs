//! The client's local HTTP endpoints: the seed's log tail and a health check.
//!
//! - `GET /api/v1/logs/tail?lines=N`: the last N (default 200) log lines of this process, the
//!   `TELEMETRY ...` lines of the log sink and the runner's forwarded lines included.
//! - `GET /health`: `{"status":"ok", ...}` with the client's counters.

use super::ClientReport;
use crate::logtail::LogTail;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Where the handlers read from.
#[derive(Clone)]
pub struct HttpState {
    /// The log lines to serve.
    pub tail: LogTail,
    /// The client's counters, read on each `/health`.
    pub report: Arc<dyn Fn() -> ClientReport + Send + Sync>,
}

/// The routes, over `state`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/api/v1/logs/tail", get(logs_tail))
        .route("/health", get(health))
        .with_state(state)
}

#[derive(Deserialize)]
struct TailQuery {
    lines: Option<usize>,
}

async fn logs_tail(State(state): State<HttpState>, Query(q): Query<TailQuery>) -> Json<Value> {
    let lines = state.tail.tail(q.lines.unwrap_or(200).min(10_000));
    Json(json!({ "count": lines.len(), "lines": lines }))
}

async fn health(State(state): State<HttpState>) -> Json<Value> {
    Json(json!({ "status": "ok", "client": (state.report)() }))
}
