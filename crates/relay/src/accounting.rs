//! One accounting of telemetry, the same wherever it is printed.
//!
//! Every hop that takes telemetry in says what became of each event, in one identity:
//!
//! ```text
//! emitted = delivered + dropped + queued
//! ```
//!
//! - **emitted**: what the hop took in (the runner: `publish_event`s; the client's egress: the
//!   envelopes it relayed, plus what a previous run left in its disk buffer and the loss reports
//!   the egress wrote itself);
//! - **delivered**: what the next hop acknowledged (the trickle server, for the runner; the
//!   metrics API, Kafka, the file or the log, for the egress);
//! - **dropped**: what is gone, every drop counted once: a full queue, a failed write, the lines of
//!   an events segment that failed for good (never also counted delivered);
//! - **queued**: what was still on its way when the numbers were read (at exit: what is left, e.g.
//!   on disk for the next start).
//!
//! The runner and client summaries, their `--report` JSON (a `"telemetry"` object), the client's
//! `/health` and the demo all print it through [`Accounting`], so it reads the same everywhere and
//! a test can check the sum on every one. Between the hops, what the runner delivered (to the
//! trickle server) but the client never read is counted by the client from the runner's line
//! numbers (`lost_in_transit` in [`crate::client::ClientReport`], reported downstream as
//! `telemetry_lost_in_transit`): runner `emitted = received + dropped + lost_in_transit`, where
//! received is the event lines the client read and dropped excludes the lines the events writer
//! lost after taking them (those are gaps, counted once, as lost in transit).

use serde::Serialize;
use telemetry::SinkStats;

/// What became of the telemetry one hop took in: `emitted = delivered + dropped + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accounting {
    /// Events taken in.
    pub emitted: u64,
    /// Events the next hop acknowledged.
    pub delivered: u64,
    /// Events gone, each counted once.
    pub dropped: u64,
    /// Events still on their way (at exit: left behind, e.g. on disk).
    pub queued: u64,
}

impl Accounting {
    /// A sink's own counters, as they are.
    pub fn of_sink(s: &SinkStats) -> Accounting {
        Accounting {
            emitted: s.emitted,
            delivered: s.delivered,
            dropped: s.dropped(),
            queued: s.queued,
        }
    }

    /// Whether the identity holds.
    pub fn balanced(&self) -> bool {
        self.emitted == self.delivered + self.dropped + self.queued
    }
}

impl std::fmt::Display for Accounting {
    /// `emitted 12 = delivered 10 + dropped 2 + queued 0`: the one form every summary prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "emitted {} = delivered {} + dropped {} + queued {}",
            self.emitted, self.delivered, self.dropped, self.queued
        )
    }
}

/// Every accounting printed in `text` (a summary on stderr, a log): each
/// `emitted E = delivered D + dropped X + queued Q` it finds, in order. For tests and tools that
/// check the identity on whatever a run printed.
pub fn find_all(text: &str) -> Vec<Accounting> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("emitted ") {
        rest = &rest[at + "emitted ".len()..];
        if let Some(a) = parse_after_emitted(rest) {
            found.push(a);
        }
    }
    found
}

/// Parses `E = delivered D + dropped X + queued Q` at the start of `s`.
fn parse_after_emitted(s: &str) -> Option<Accounting> {
    let mut words = s.split_whitespace();
    let mut number = |label: Option<&str>, sep: &str| -> Option<u64> {
        if let Some(label) = label {
            (words.next()? == label).then_some(())?;
        }
        let n = words.next()?.trim_end_matches([',', ';', ')', '.']);
        let n = n.parse().ok()?;
        if !sep.is_empty() {
            (words.next()? == sep).then_some(())?;
        }
        Some(n)
    };
    let emitted = number(None, "=")?;
    let delivered = number(Some("delivered"), "+")?;
    let dropped = number(Some("dropped"), "+")?;
    let queued = number(Some("queued"), "")?;
    Some(Accounting {
        emitted,
        delivered,
        dropped,
        queued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_finds_the_identity() {
        let a = Accounting {
            emitted: 12,
            delivered: 9,
            dropped: 2,
            queued: 1,
        };
        assert!(a.balanced());
        let text = format!("runner: telemetry {a}; 2 lost\nclient: emitted 3 = delivered 1 + dropped 1 + queued 0 (on disk)");
        assert_eq!(
            find_all(&text),
            vec![
                a,
                Accounting {
                    emitted: 3,
                    delivered: 1,
                    dropped: 1,
                    queued: 0
                }
            ]
        );
        assert!(!find_all(&text)[1].balanced());
        assert!(find_all("telemetry emitted 2, delivered 2").is_empty());
    }
}
