//! [`Batch`]: the records a service is asked to send, and what became of each.

use crate::buffer::{Item, Oldest, Source};
use crate::Reason;

/// Where one record of a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Not resolved yet: the service sends it.
    Pending,
    /// The destination took it.
    Delivered,
    /// Dropped for good, for this reason.
    Dropped(&'static Reason),
}

/// The oldest buffered records of one source (disk or memory), oldest first, each pending or
/// resolved. A service sends the pending ones; it may resolve them one by one.
#[derive(Debug)]
pub struct Batch {
    source: Source,
    items: Vec<Item>,
    state: Vec<State>,
}

impl Batch {
    pub(crate) fn new(oldest: Oldest) -> Batch {
        let state = vec![State::Pending; oldest.items.len()];
        Batch {
            source: oldest.source,
            items: oldest.items,
            state,
        }
    }

    /// Records in the batch, resolved or not.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The record at `idx`, as the encoder stored it.
    pub fn record(&self, idx: usize) -> &[u8] {
        &self.items[idx].bytes
    }

    /// The indexes of the records still to send, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.items.len()).filter(|&i| self.state[i] == State::Pending)
    }

    /// How many records are still to send.
    pub fn pending_count(&self) -> usize {
        self.state.iter().filter(|s| **s == State::Pending).count()
    }

    /// The destination took record `idx` (ignored unless it is pending).
    pub fn deliver(&mut self, idx: usize) {
        self.resolve(idx, State::Delivered);
    }

    /// Record `idx` is dropped for good, counted under `reason` (ignored unless it is pending).
    pub fn drop_record(&mut self, idx: usize, reason: &'static Reason) {
        self.resolve(idx, State::Dropped(reason));
    }

    fn resolve(&mut self, idx: usize, to: State) {
        if let Some(s) = self.state.get_mut(idx).filter(|s| **s == State::Pending) {
            *s = to;
        }
    }

    /// Resolves every pending record as `to`.
    pub(crate) fn resolve_pending(&mut self, to: State) {
        for s in self.state.iter_mut().filter(|s| **s == State::Pending) {
            *s = to;
        }
    }

    /// Whether some record is resolved (the service resolved them one by one).
    pub(crate) fn progressed(&self) -> bool {
        self.state.iter().any(|s| *s != State::Pending)
    }

    /// Splits off the newer half (for [`crate::Outcome::Split`]).
    pub(crate) fn split_off_back(&mut self) -> Batch {
        let at = self.items.len() / 2;
        Batch {
            source: self.source,
            items: self.items.split_off(at),
            state: self.state.split_off(at),
        }
    }

    pub(crate) fn source(&self) -> Source {
        self.source
    }

    /// The buffer key of the newest record: removing through it removes the batch.
    pub(crate) fn last_key(&self) -> u64 {
        self.items.last().map_or(0, |i| i.key)
    }

    pub(crate) fn states(&self) -> &[State] {
        &self.state
    }
}
