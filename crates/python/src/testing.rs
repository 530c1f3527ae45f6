//! `TrickleServer`: this project's trickle server, in process, for tests and local runs (a
//! runner and a client on one machine, or a Scope test suite without go-livepeer).

use crate::runtime;
use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use std::net::SocketAddr;
use trickle::server::{Channels, Server, ServerConfig};

/// A trickle server on a Rust thread: `TrickleServer("127.0.0.1:0")` listens on a free port;
/// `url` is its base URL (`http://127.0.0.1:PORT/`). Channels are created on first publish
/// (autocreate) or with `create_channel(name)`. `close()` stops it.
#[pyclass(frozen, module = "trickle_relay")]
pub struct TrickleServer {
    server: Mutex<Option<Server>>,
    channels: Channels,
    url: String,
}

#[pymethods]
impl TrickleServer {
    #[new]
    #[pyo3(signature = (listen="127.0.0.1:0"))]
    fn new(py: Python<'_>, listen: &str) -> PyResult<Self> {
        let addr: SocketAddr = listen.parse().map_err(|_| {
            PyValueError::new_err(format!("listen must be an IP:PORT address, got {listen:?}"))
        })?;
        let config = ServerConfig {
            autocreate: true,
            ..ServerConfig::default()
        };
        let server = runtime::block_on(py, Server::bind(addr, config))?
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {addr}: {e}")))?;
        Ok(TrickleServer {
            channels: server.channels(),
            url: server.url(),
            server: Mutex::new(Some(server)),
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:8935/`.
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }

    /// Create the JSONL channel `name` (so that a reader can subscribe before the first
    /// publish); returns its URL.
    fn create_channel(&self, name: &str) -> PyResult<String> {
        self.channels
            .create(name, Some("application/jsonl"))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(format!("{}/{}", self.url.trim_end_matches('/'), name))
    }

    /// Stop the server (idempotent).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.server.lock().take();
        if let Some(server) = server {
            runtime::block_on(py, server.shutdown())?;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("TrickleServer({:?})", self.url)
    }
}
