//! [`MemorySink`]: keeps every event in memory, for tests and for embedding in-process consumers.

use crate::envelope::Event;
use crate::sink::{Sink, SinkStats};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Keeps every emitted event, in order, until [`MemorySink::take`].
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
    emitted: AtomicU64,
}

impl MemorySink {
    /// An empty memory sink.
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// A copy of the events kept so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }

    /// Moves the events kept so far out.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock())
    }

    /// Events kept now.
    pub fn len(&self) -> usize {
        self.events.lock().len()
    }

    /// Nothing kept.
    pub fn is_empty(&self) -> bool {
        self.events.lock().is_empty()
    }
}

impl Sink for MemorySink {
    fn emit(&self, event: Event) {
        self.events.lock().push(event);
        self.emitted.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> SinkStats {
        let n = self.emitted.load(Ordering::Relaxed);
        SinkStats {
            emitted: n,
            delivered: n,
            ..SinkStats::default()
        }
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
