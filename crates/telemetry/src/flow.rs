//! Flow control of the runner's telemetry: a budget that keeps the client inside the trickle
//! server's window, so overload sheds heartbeats at the source instead of losing whole segments
//! (lifecycle and `error` events with them) in transit.
//!
//! The server keeps the last 5 segments of a channel; a client more than that behind skips
//! segments. The runner numbers every telemetry line it writes (`seq`); the client tells it, over
//! the control channel, the last `seq` it has read (`telemetry_flow {read_seq}`, a few times a
//! second while lines flow). From those reports [`FlowControl`] knows the client's *lag* (lines
//! written but not yet read) and its read rate, and sets the events budget:
//!
//! ```text
//!   lag <= low                 no budget (write as fast as events come)
//!   low < lag < high           budget = client rate × (high - lag) / (high - low), at least MIN_BUDGET
//!   lag >= high, or the client
//!   silent for SILENT while
//!   lagging                    MIN_BUDGET
//! ```
//!
//! where `low` is 0.75 segment and `high` 3 segments of lines (the window holds 4 full segments
//! behind the one being written), converted to lines with the runner's mean line size. A budget
//! below the client's rate lets it catch up; while the budget holds, the sink's queue fills and
//! sheds heartbeats first, counted and reported as `telemetry_dropped` as any other drop. A
//! stalled client (stopped, starved) stops reporting while its lag grows: the budget falls to
//! [`MIN_BUDGET`], so it finds its lines still in the window when it comes back. A client that
//! never reports (one that does not speak this, e.g. Scope's) never limits the runner.

use std::time::{Duration, Instant};

/// The lowest budget (events per second): lifecycle and `error` events keep flowing.
pub const MIN_BUDGET: f64 = 100.0;

/// A lagging client that has not reported for this long is taken as stalled.
pub const SILENT: Duration = Duration::from_millis(500);

/// Lag (in segments) below which the runner writes freely.
const LOW_SEGMENTS: f64 = 0.75;

/// Lag (in segments) at which the budget is at its lowest.
const HIGH_SEGMENTS: f64 = 3.0;

/// The runner's view of one client's reading, and the budget it implies.
#[derive(Debug, Clone)]
pub struct FlowControl {
    segment_bytes: f64,
    /// The last report: when, and the `seq` read.
    last: Option<(Instant, u64)>,
    /// The client's read rate, lines per second (smoothed).
    rate: f64,
}

impl FlowControl {
    /// Flow control for an events channel whose writer rotates segments at `segment_bytes`.
    pub fn new(segment_bytes: usize) -> FlowControl {
        FlowControl {
            segment_bytes: segment_bytes.max(1) as f64,
            last: None,
            rate: 0.0,
        }
    }

    /// The client says it has read every line up to `read_seq`, at `now`.
    pub fn client_read(&mut self, now: Instant, read_seq: u64) {
        if let Some((at, seq)) = self.last {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if read_seq < seq {
                // An older report overtaken by a newer one: ignore it.
                return;
            }
            if dt >= 0.01 {
                let r = (read_seq - seq) as f64 / dt;
                self.rate = if self.rate == 0.0 {
                    r
                } else {
                    0.5 * self.rate + 0.5 * r
                };
            } else if read_seq == seq {
                return;
            }
        }
        self.last = Some((now, read_seq));
    }

    /// The last `seq` the client reported, if it ever did.
    pub fn read_seq(&self) -> Option<u64> {
        self.last.map(|(_, s)| s)
    }

    /// The client's read rate, lines per second (0 until two reports).
    pub fn client_rate(&self) -> f64 {
        self.rate
    }

    /// What may be written now, given the last `seq` written and the mean line size.
    pub fn limit(&self, now: Instant, last_written: u64, mean_line_bytes: usize) -> Limit {
        let Some((at, read)) = self.last else {
            return Limit::None;
        };
        let lag = last_written.saturating_sub(read) as f64;
        let per_segment = self.segment_bytes / mean_line_bytes.max(1) as f64;
        let (low, high) = (LOW_SEGMENTS * per_segment, HIGH_SEGMENTS * per_segment);
        if lag < low {
            return Limit::Lines((low - lag).ceil() as usize);
        }
        if lag >= high || now.saturating_duration_since(at) >= SILENT {
            return Limit::Rate(MIN_BUDGET);
        }
        Limit::Rate((self.rate * (high - lag) / (high - low)).max(MIN_BUDGET))
    }

    /// The budget (events per second) now, `None` while the client is close enough to write
    /// freely (see [`FlowControl::limit`]).
    pub fn budget(&self, now: Instant, last_written: u64, mean_line_bytes: usize) -> Option<f64> {
        match self.limit(now, last_written, mean_line_bytes) {
            Limit::Rate(r) => Some(r),
            Limit::None | Limit::Lines(_) => None,
        }
    }
}

/// What [`FlowControl::limit`] allows now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// No report from the client: no limit.
    None,
    /// This many more lines before the lag reaches the free zone's end.
    Lines(usize),
    /// Held to a budget, events per second.
    Rate(f64),
}

/// A token bucket holding a consumer to a budget (events per second), with at most 50 ms of
/// burst.
#[derive(Debug, Clone)]
pub struct Tokens {
    tokens: f64,
    at: Instant,
}

impl Tokens {
    /// An empty bucket.
    pub fn new(now: Instant) -> Tokens {
        Tokens {
            tokens: 0.0,
            at: now,
        }
    }

    /// How many events may go now under `budget` (taken from the bucket).
    pub fn take(&mut self, now: Instant, budget: f64) -> usize {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let cap = (budget * 0.05).max(1.0);
        self.tokens = (self.tokens + budget * dt).min(cap);
        let n = self.tokens.floor();
        self.tokens -= n;
        n as usize
    }

    /// Gives back `n` tokens taken but not used.
    pub fn give_back(&mut self, n: usize) {
        self.tokens += n as f64;
    }

    /// How long until the next token, under `budget`.
    pub fn until_next(&self, budget: f64) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / budget.max(1e-3))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: usize = 1 << 20;

    #[test]
    fn no_reports_no_budget() {
        let f = FlowControl::new(SEG);
        assert_eq!(f.budget(Instant::now(), 1_000_000, 500), None);
    }

    #[test]
    fn the_budget_falls_as_the_lag_grows_and_lifts_once_caught_up() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        // 2,097 lines of 500 B per segment.
        f.client_read(t0, 0);
        f.client_read(t0 + Duration::from_millis(100), 10_000); // 100,000 lines/s
        let now = t0 + Duration::from_millis(100);
        assert_eq!(f.budget(now, 10_500, 500), None, "half a segment behind");
        let near = f.budget(now, 10_000 + 2_000, 500).unwrap();
        let far = f.budget(now, 10_000 + 5_000, 500).unwrap();
        assert!(near < 100_000.0 && far < near, "{near} {far}");
        assert_eq!(f.budget(now, 10_000 + 7_000, 500), Some(MIN_BUDGET));
        f.client_read(now + Duration::from_millis(100), 16_900);
        assert_eq!(
            f.budget(now + Duration::from_millis(100), 17_000, 500),
            None
        );
    }

    #[test]
    fn a_lagging_client_that_stops_reporting_gets_the_minimum() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        f.client_read(t0, 0);
        f.client_read(t0 + Duration::from_millis(100), 1_000);
        let later = t0 + Duration::from_millis(100) + SILENT;
        assert_eq!(f.budget(later, 3_000, 500), Some(MIN_BUDGET));
        assert_eq!(f.budget(later, 1_100, 500), None, "not lagging: no limit");
    }

    #[test]
    fn tokens_follow_the_budget() {
        let t0 = Instant::now();
        let mut t = Tokens::new(t0);
        assert_eq!(t.take(t0, 1000.0), 0);
        assert_eq!(t.take(t0 + Duration::from_millis(10), 1000.0), 10);
        // At most 50 ms of burst.
        assert_eq!(t.take(t0 + Duration::from_secs(10), 1000.0), 50);
        t.give_back(3);
        assert_eq!(t.take(t0 + Duration::from_secs(10), 1000.0), 3);
        assert!(t.until_next(1000.0) <= Duration::from_millis(1));
    }
}
