//! The two relay roles of telemetry over trickle.
//!
//! - [`runner`]: the GPU side. Subscribes to the control channel, answers it (with a simulated
//!   pipeline: there is no GPU work here), and sends every telemetry event it produces, or that a
//!   local process hands it through the loopback [`runner::ingest`] endpoint, to the client over the
//!   events channel.
//! - [`client`]: the local side. Reads the events channel, dispatches each message, and re-publishes
//!   telemetry, verbatim plus `data.relayed_via` / `data.relay_received_timestamp`, through one
//!   egress sink.
//!
//! Both sides agree on a [`SessionIds`]: the client rejects telemetry that claims another session.

pub mod accounting;
pub mod channels;
pub mod client;
pub mod logtail;
pub mod runner;
mod session;

pub use session::SessionIds;

/// Milliseconds since the Unix epoch, the clock of every timestamp on the wire.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
