//! Where accepted events go: the [`Output`] trait, and `--output` specs.
//!
//! The embedded default is [`JsonlOutput`] (`jsonl:PATH`): one event per line, appended and
//! fsynced before the request is answered. Adding another output (Kafka, ...) is one file here
//! that implements [`Output`], plus one arm in [`open`].

mod jsonl;

pub use jsonl::JsonlOutput;

use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;

/// A failed output operation; the request is answered 503 and the reporter retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("output {output} failed: {reason}")]
pub struct OutputError {
    /// The output's name.
    pub output: &'static str,
    /// What failed.
    pub reason: String,
}

/// A durable destination for accepted events.
pub trait Output: Send + Sync + 'static {
    /// A short name for logs and `/health` (`"jsonl"`).
    fn name(&self) -> &'static str;

    /// Appends `events` (each one JSON object, without a newline) in order, and resolves once they
    /// are durable: the collector answers 200 only after this returned `Ok`. On `Err` none of them
    /// may be considered written (the reporter re-sends them).
    fn append(&self, events: Vec<Bytes>) -> BoxFuture<'_, Result<(), OutputError>>;

    /// `Ok` when appends can succeed now (`GET /ready`).
    fn check_ready(&self) -> BoxFuture<'_, Result<(), OutputError>>;

    /// Ids of up to `limit` of the latest events it holds, to seed the dedup window at start so
    /// duplicates are caught across collector restarts too. Default: none.
    fn recent_ids(&self, limit: usize) -> Vec<String> {
        let _ = limit;
        Vec::new()
    }
}

/// Opens the output an `--output` spec names: `jsonl:PATH`.
pub fn open(spec: &str) -> Result<Arc<dyn Output>, String> {
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    match kind {
        "jsonl" if !arg.is_empty() => JsonlOutput::open(arg.as_ref())
            .map(|o| Arc::new(o) as Arc<dyn Output>)
            .map_err(|e| e.to_string()),
        _ => Err(format!(
            "unknown output {spec:?}; use jsonl:PATH (an append-only JSON-lines file)"
        )),
    }
}
