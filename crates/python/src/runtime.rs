//! The one Tokio runtime of the package: every drain task, writer, reader and events loop runs
//! on it, never on a Python thread. Two worker threads, started on first use.
//!
//! Python threads block on it only through [`block_on`], which releases the GIL first.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::{Builder, Handle, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The runtime's handle, starting the runtime on first use.
pub fn handle() -> PyResult<Handle> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("trickle-relay")
        .enable_all()
        .build()
        .map_err(|e| {
            PyRuntimeError::new_err(format!("cannot start the trickle_relay runtime: {e}"))
        })?;
    // Two threads racing here: the loser's runtime (no task on it yet) is dropped.
    Ok(RUNTIME.get_or_init(|| rt).handle().clone())
}

/// Runs `fut` to completion on the runtime with the GIL released.
pub fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let handle = handle()?;
    Ok(py.allow_threads(move || handle.block_on(fut)))
}
