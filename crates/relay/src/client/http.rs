//! The client's local HTTP endpoints: the seed's log tail and a health check.
//!
//! - `GET /api/v1/logs/tail?lines=N&since_offset=B`: this process's log lines (the `TELEMETRY ...`
//!   lines of the log sink and the runner's forwarded lines included), answered exactly as Scope's
//!   endpoint answers, `{"lines": [...], "offset": <int>}`: `lines` 1..=1000 (default 200),
//!   `since_offset` >= 0 (default 0), `offset` the log's size in bytes; see
//!   [`LogTail::read`](crate::logtail::LogTail::read) for which lines. A value out of range, or
//!   not an integer, is answered 422 with FastAPI's validation body
//!   (`{"detail": [{"type", "loc", "msg", "input", "ctx"?}]}`).
//! - `GET /health`: `{"status":"ok", "client": {...}, "telemetry": {...}}`: the client's counters
//!   and the egress's accounting (`emitted = delivered + dropped + queued`, see
//!   [`crate::accounting`]; `null` without an egress).

use super::ClientReport;
use crate::accounting::Accounting;
use crate::logtail::LogTail;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// Where the handlers read from.
#[derive(Clone)]
pub struct HttpState {
    /// The log lines to serve.
    pub tail: LogTail,
    /// The client's counters, read on each `/health`.
    pub report: Arc<dyn Fn() -> ClientReport + Send + Sync>,
    /// What became of the telemetry handed to the egress so far (`None`: no egress), read on
    /// each `/health`.
    pub telemetry: Arc<dyn Fn() -> Option<Accounting> + Send + Sync>,
}

/// The routes, over `state`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/api/v1/logs/tail", get(logs_tail))
        .route("/health", get(health))
        .with_state(state)
}

/// `lines`: Scope's default and bounds.
const LINES: (i64, i64, i64) = (200, 1, 1000);

async fn logs_tail(
    State(state): State<HttpState>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let param = |name: &str| {
        q.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (default, min, max) = LINES;
    let mut problems = Vec::new();
    let lines = int_param(
        "lines",
        param("lines"),
        default,
        min,
        Some(max),
        &mut problems,
    );
    let since = int_param(
        "since_offset",
        param("since_offset"),
        0,
        0,
        None,
        &mut problems,
    );
    if !problems.is_empty() {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "detail": problems })),
        )
            .into_response();
    }
    // Both are validated non-negative above.
    let page = state.tail.read(lines as usize, since as u64);
    Json(page).into_response()
}

/// A query integer with FastAPI's validation: `ge=min` (and `le=max`); a problem is added to
/// `problems` in FastAPI's shape (and the default returned) when the value is not usable.
fn int_param(
    name: &str,
    raw: Option<&str>,
    default: i64,
    min: i64,
    max: Option<i64>,
    problems: &mut Vec<Value>,
) -> i64 {
    let Some(raw) = raw else {
        return default;
    };
    let loc = json!(["query", name]);
    let value = match raw.trim().parse::<i64>() {
        Ok(v) => v,
        Err(_) => {
            problems.push(json!({
                "type": "int_parsing",
                "loc": loc,
                "msg": "Input should be a valid integer, unable to parse string as an integer",
                "input": raw,
            }));
            return default;
        }
    };
    if value < min {
        problems.push(json!({
            "type": "greater_than_equal",
            "loc": loc,
            "msg": format!("Input should be greater than or equal to {min}"),
            "input": raw,
            "ctx": {"ge": min},
        }));
        return default;
    }
    if let Some(max) = max.filter(|max| value > *max) {
        problems.push(json!({
            "type": "less_than_equal",
            "loc": loc,
            "msg": format!("Input should be less than or equal to {max}"),
            "input": raw,
            "ctx": {"le": max},
        }));
        return default;
    }
    value
}

async fn health(State(state): State<HttpState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "client": (state.report)(),
        "telemetry": (state.telemetry)(),
    }))
}
