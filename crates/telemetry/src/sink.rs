//! The sink contract and the process-wide sink that [`publish_event`] feeds.
//!
//! A sink is where an envelope goes next. For every sink, [`Sink::emit`] is safe from any thread,
//! never blocks the caller and never fails to the caller: telemetry must not stall media or control
//! paths. What a sink cannot deliver it drops, and counts ([`SinkStats`]).
//!
//! One sink is installed per process at a time ([`install_sink`]); the runner installs its
//! [`crate::sinks::TrickleEventsSink`] for the life of the control subscription, the client installs
//! its egress sink. With none installed, or with telemetry opted out
//! ([`crate::egress::telemetry_enabled_from_env`]), publishing is a no-op that costs an atomic load.

use crate::envelope::{Envelope, Event, Fields, RawEnvelope};
use arc_swap::ArcSwapOption;
use serde::Serialize;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// Where envelopes go next. See the module docs for the contract.
pub trait Sink: Send + Sync + 'static {
    /// Hands one event to the sink: any thread, never blocks, never fails (drops are counted).
    fn emit(&self, event: Event);
    /// Running totals.
    fn stats(&self) -> SinkStats;
    /// A short fixed name for logs and loss reports (`"trickle_events"`, `"log"`, ...).
    fn name(&self) -> &'static str;
    /// Blocks until events emitted before the call are delivered, where the sink can tell
    /// (the file sink: written and synced); a no-op for sinks that deliver synchronously or
    /// asynchronously. For shutdown paths, never for hot paths. Failures are logged and counted.
    fn flush(&self) {}
}

/// Running totals of one sink. Invariant once idle: `emitted == delivered + dropped() + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// Events handed to `emit`.
    pub emitted: u64,
    /// Events written to the sink's destination.
    pub delivered: u64,
    /// `High` events dropped (queue eviction, failed write, or emitted after shutdown).
    pub dropped_high: u64,
    /// `Low` events dropped (same causes).
    pub dropped_low: u64,
    /// Events accepted and not yet delivered or dropped (queued or being written).
    pub queued: u64,
    /// Loss reports (`telemetry_dropped` envelopes) the sink wrote itself; not counted above.
    pub reports: u64,
    /// Failed writes to the destination (each may drop several events).
    pub write_errors: u64,
}

impl SinkStats {
    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.dropped_high + self.dropped_low
    }
}

struct Installed {
    sink: Arc<dyn Sink>,
}

static SINK: ArcSwapOption<Installed> = ArcSwapOption::const_empty();

/// Keeps a sink installed; dropping it uninstalls that sink (unless another one replaced it since).
#[must_use = "dropping the guard uninstalls the sink at once"]
pub struct SinkGuard {
    installed: Arc<Installed>,
}

impl SinkGuard {
    /// The installed sink.
    pub fn sink(&self) -> &Arc<dyn Sink> {
        &self.installed.sink
    }
}

impl std::fmt::Debug for SinkGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkGuard")
            .field("sink", &self.installed.sink.name())
            .finish()
    }
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        // Only clear the slot if it still holds *this* installation; a newer one stays.
        let current = Some(Arc::clone(&self.installed));
        SINK.compare_and_swap(&current, None);
    }
}

/// Installs `sink` as the process-wide sink, replacing any other, until the guard is dropped.
pub fn install_sink(sink: Arc<dyn Sink>) -> SinkGuard {
    let installed = Arc::new(Installed { sink });
    SINK.store(Some(Arc::clone(&installed)));
    SinkGuard { installed }
}

/// The sink installed now, if any.
pub fn installed_sink() -> Option<Arc<dyn Sink>> {
    SINK.load_full().map(|i| Arc::clone(&i.sink))
}

const UNKNOWN: u8 = 0;
const ENABLED: u8 = 1;
const DISABLED: u8 = 2;
static ENABLED_STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether publishing is on. Read from the environment once, on first use
/// ([`crate::egress::telemetry_enabled_from_env`]), unless [`set_telemetry_enabled`] said first.
pub fn telemetry_enabled() -> bool {
    match ENABLED_STATE.load(Ordering::Relaxed) {
        ENABLED => true,
        DISABLED => false,
        _ => {
            let on = crate::egress::telemetry_enabled_from_env();
            let state = if on { ENABLED } else { DISABLED };
            // A concurrent `set_telemetry_enabled` wins over this first read.
            match ENABLED_STATE.compare_exchange(
                UNKNOWN,
                state,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => on,
                Err(now) => now == ENABLED,
            }
        }
    }
}

/// Turns publishing on or off for the whole process (overrides the environment).
pub fn set_telemetry_enabled(on: bool) {
    ENABLED_STATE.store(if on { ENABLED } else { DISABLED }, Ordering::Relaxed);
}

/// Builds an envelope for `event_type` (stamped now) and hands it to the installed sink.
///
/// Never blocks, never fails; a no-op without a sink or when telemetry is opted out.
pub fn publish_event(event_type: &str, fields: Fields) {
    if !telemetry_enabled() {
        return;
    }
    let guard = SINK.load();
    if let Some(installed) = guard.as_ref() {
        installed
            .sink
            .emit(Event::Built(Box::new(Envelope::new(event_type, fields))));
    }
}

/// Forwards an envelope received from another hop, verbatim, to the installed sink.
pub fn publish_raw_event(envelope: RawEnvelope) {
    publish(Event::Raw(envelope));
}

/// Hands any event to the installed sink (a no-op without one or when opted out).
pub fn publish(event: Event) {
    if !telemetry_enabled() {
        return;
    }
    let guard = SINK.load();
    if let Some(installed) = guard.as_ref() {
        installed.sink.emit(event);
    }
}
