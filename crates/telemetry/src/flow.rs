//! Flow control of the runner's telemetry: a window of credit that keeps the client inside the
//! trickle server's window, so overload sheds heartbeats at the source instead of losing whole
//! segments (lifecycle and `error` events with them) in transit.
//!
//! The server keeps the last 5 segments of a channel, and one of them is the publisher's
//! preconnected next segment: a client reading segment `c` loses what it has not read of it as
//! soon as the writer opens segment `c + 4`. The runner numbers every telemetry line it writes
//! (`seq`); the client tells it, over the control channel, the last `seq` it has read
//! (`telemetry_flow {read_seq}`, every few milliseconds while lines flow). [`FlowControl`]
//! remembers where each batch of lines ended in the byte stream, so it knows the client's *lag*
//! in bytes: what was handed to the events writer but not yet read. It lets the drain write only
//! while that lag stays under [`WINDOW_SEGMENTS`] segments (credit, as TCP's window):
//!
//! ```text
//!   no report yet (a client that does not speak this, e.g. Scope's)   no limit
//!   lag < window                                                       write up to the window
//!   lag >= window, the client reported within SILENT                   write nothing
//!   lag >= window, the client silent for SILENT (stalled, or gone)     MIN_BUDGET events/s,
//!                                                                      up to TRICKLE_SEGMENTS
//! ```
//!
//! The writer's head is then never more than 2.5 segments past the client's read position, so
//! it stays inside segment `c + 3`, which leaves the client's segment in the server's ring,
//! with half a segment of slack for lines this sink does not write (answers, log batches). The
//! credit is a bound on what is *in flight*, not a rate: it is spent on lines handed to the
//! writer, queued or not, and comes back only with the client's reports, so however deep the
//! runner's queue, and however bursty its drain, nothing is written that the client cannot read.
//! While the drain is held, its queue fills and sheds heartbeats first (counted and reported as
//! `telemetry_dropped`, as any drop). A client silent while at the limit gets a trickle
//! ([`MIN_BUDGET`]) into part of the slack (up to [`TRICKLE_SEGMENTS`] of lag, never further,
//! however long the silence), so a client that takes over the channel (reading from its current
//! segment) sees numbered lines and starts reporting. Lifecycle and `error` events past that wait
//! in the queue, which never sheds them before heartbeats.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The budget (events per second) for a client silent at the limit: lifecycle and `error`
/// events keep flowing, and a client that took over starts reporting.
pub const MIN_BUDGET: f64 = 100.0;

/// A client at the limit that has not reported for this long is taken as stalled (or gone).
pub const SILENT: Duration = Duration::from_millis(500);

/// The credit, in segments of the events writer: how far (in bytes) the writer may be ahead of
/// the client's read position. The server's ring leaves 3 full segments behind the one written
/// (the fifth slot is the preconnected next one); half a segment is slack.
pub const WINDOW_SEGMENTS: f64 = 2.5;

/// The most a silent client's trickle ([`MIN_BUDGET`]) takes the lag to, in segments: most of the
/// slack, never all of it.
pub const TRICKLE_SEGMENTS: f64 = 2.9;

/// The runner's view of one client's reading, and the credit it leaves.
#[derive(Debug, Clone)]
pub struct FlowControl {
    /// The credit in bytes ([`WINDOW_SEGMENTS`] segments).
    window_bytes: u64,
    /// The trickle's limit in bytes ([`TRICKLE_SEGMENTS`] segments).
    trickle_bytes: u64,
    /// The last report: when, and the `seq` read.
    last: Option<(Instant, u64)>,
    /// Batches written and not yet known read: (last `seq` in it, bytes written up to its end).
    in_flight: VecDeque<(u64, u64)>,
    /// Bytes written up to the end of the last batch known read (the client's position, at
    /// least).
    read_bytes: u64,
    /// Bytes written in all.
    written_bytes: u64,
    /// The last `seq` written.
    last_seq: u64,
}

impl FlowControl {
    /// Flow control for an events channel whose writer rotates segments at `segment_bytes`.
    pub fn new(segment_bytes: usize) -> FlowControl {
        FlowControl {
            window_bytes: (segment_bytes.max(1) as f64 * WINDOW_SEGMENTS) as u64,
            trickle_bytes: (segment_bytes.max(1) as f64 * TRICKLE_SEGMENTS) as u64,
            last: None,
            in_flight: VecDeque::new(),
            read_bytes: 0,
            written_bytes: 0,
            last_seq: 0,
        }
    }

    /// A batch was handed to the writer: its event lines end at `last_seq`, and it took `bytes`
    /// (loss report lines included).
    pub fn wrote(&mut self, last_seq: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.written_bytes += bytes;
        self.last_seq = self.last_seq.max(last_seq);
        match self.in_flight.back_mut() {
            // A batch without new event lines (a lone report) extends the one before.
            Some(back) if back.0 == last_seq => back.1 = self.written_bytes,
            _ => self.in_flight.push_back((last_seq, self.written_bytes)),
        }
    }

    /// The client says it has read every line up to `read_seq`, at `now`.
    pub fn client_read(&mut self, now: Instant, read_seq: u64) {
        if read_seq > self.last_seq {
            // Not a line of this sink (a report about a previous runner's lines): ignored.
            return;
        }
        if self.last.is_some_and(|(_, seq)| read_seq < seq) {
            // An older report overtaken by a newer one.
            return;
        }
        self.last = Some((now, read_seq));
        while let Some(&(seq, end)) = self.in_flight.front() {
            if seq > read_seq {
                break;
            }
            self.read_bytes = end;
            self.in_flight.pop_front();
        }
    }

    /// The last `seq` the client reported, if it ever did.
    pub fn read_seq(&self) -> Option<u64> {
        self.last.map(|(_, s)| s)
    }

    /// Bytes written but not known read (0 before the first report).
    pub fn lag_bytes(&self) -> u64 {
        match self.last {
            Some(_) => self.written_bytes - self.read_bytes,
            None => 0,
        }
    }

    /// The credit left, in bytes (`None`: no report, no limit).
    pub fn credit_bytes(&self) -> Option<u64> {
        self.last
            .map(|_| self.window_bytes.saturating_sub(self.lag_bytes()))
    }

    /// What may be written now; `line_bytes` is what an event line is expected to take.
    pub fn limit(&self, now: Instant, line_bytes: usize) -> Limit {
        let (Some((at, _)), Some(credit)) = (self.last, self.credit_bytes()) else {
            return Limit::None;
        };
        let lines = (credit / line_bytes.max(1) as u64) as usize;
        if lines > 0 {
            return Limit::Lines(lines);
        }
        if now.saturating_duration_since(at) >= SILENT
            && self.lag_bytes() + line_bytes as u64 <= self.trickle_bytes
        {
            return Limit::Rate(MIN_BUDGET);
        }
        Limit::Lines(0)
    }

    /// Lines of `line_bytes` the trickle may still add before the lag reaches
    /// [`TRICKLE_SEGMENTS`] (a [`Limit::Rate`] batch takes at most this many).
    pub fn trickle_lines(&self, line_bytes: usize) -> usize {
        (self.trickle_bytes.saturating_sub(self.lag_bytes()) / line_bytes.max(1) as u64) as usize
    }

    /// The events budget (events per second) now: `Some(0.0)` while held at the limit,
    /// [`MIN_BUDGET`] while held for a silent client, `None` while there is credit left.
    pub fn budget(&self, now: Instant, line_bytes: usize) -> Option<f64> {
        match self.limit(now, line_bytes) {
            Limit::Rate(r) => Some(r),
            Limit::Lines(0) => Some(0.0),
            Limit::None | Limit::Lines(_) => None,
        }
    }
}

/// What [`FlowControl::limit`] allows now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// No report from the client: no limit.
    None,
    /// This many more event lines (0: held until the client reports).
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
    const WINDOW: u64 = (SEG as f64 * WINDOW_SEGMENTS) as u64;

    #[test]
    fn no_reports_no_limit() {
        let mut f = FlowControl::new(SEG);
        f.wrote(100_000, 50_000_000);
        assert_eq!(f.limit(Instant::now(), 500), Limit::None);
        assert_eq!(f.budget(Instant::now(), 500), None);
    }

    #[test]
    fn the_credit_is_the_window_less_what_was_written_and_not_read() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        // Batches of 1,000 lines of 500 bytes.
        for b in 1..=4u64 {
            f.wrote(b * 1000, 500_000);
        }
        f.client_read(t0, 0);
        assert_eq!(f.lag_bytes(), 2_000_000);
        assert_eq!(
            f.limit(t0, 500),
            Limit::Lines(((WINDOW - 2_000_000) / 500) as usize)
        );
        // Read into the third batch: only the first two are known read (the position is a
        // lower bound, never an overestimate).
        f.client_read(t0, 2_500);
        assert_eq!(f.lag_bytes(), 1_000_000);
        f.client_read(t0, 4_000);
        assert_eq!(f.lag_bytes(), 0);
        assert_eq!(f.credit_bytes(), Some(WINDOW));
    }

    #[test]
    fn at_the_limit_nothing_goes_until_the_client_reports() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        f.wrote(1, 500);
        f.client_read(t0, 0);
        f.wrote(WINDOW / 500, WINDOW - 500);
        assert_eq!(f.limit(t0, 500), Limit::Lines(0));
        assert_eq!(f.budget(t0, 500), Some(0.0));
        // However long it stays held while the client reports (older reports change nothing).
        f.client_read(t0 + Duration::from_millis(400), 0);
        assert_eq!(
            f.limit(t0 + Duration::from_millis(800), 500),
            Limit::Lines(0)
        );
        f.client_read(t0 + Duration::from_millis(900), WINDOW / 500);
        assert_eq!(f.lag_bytes(), 0);
    }

    #[test]
    fn a_client_silent_at_the_limit_gets_the_minimum() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        f.wrote(10, 5_000);
        f.client_read(t0, 10);
        f.wrote(10 + WINDOW / 500, WINDOW);
        assert_eq!(f.limit(t0 + SILENT / 2, 500), Limit::Lines(0));
        assert_eq!(f.limit(t0 + SILENT, 500), Limit::Rate(MIN_BUDGET));
        // The trickle stops short of the window's end, however long the silence.
        let trickle = (SEG as f64 * TRICKLE_SEGMENTS) as u64;
        assert_eq!(f.trickle_lines(500), ((trickle - WINDOW) / 500) as usize);
        f.wrote(11 + WINDOW / 500, trickle - WINDOW - 400);
        assert_eq!(f.trickle_lines(500), 0);
        assert_eq!(f.limit(t0 + SILENT * 100, 500), Limit::Lines(0));
    }

    #[test]
    fn a_report_beyond_what_was_written_is_not_this_sinks_and_is_ignored() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        f.wrote(100, 50_000);
        // A previous runner's client read up to 90,000 of its own lines.
        f.client_read(t0, 90_000);
        assert_eq!(f.read_seq(), None);
        f.client_read(t0, 50);
        assert_eq!(f.read_seq(), Some(50));
        assert_eq!(f.lag_bytes(), 50_000, "batch 1..=100 not read whole yet");
    }

    #[test]
    fn a_lone_report_extends_the_batch_before_it() {
        let t0 = Instant::now();
        let mut f = FlowControl::new(SEG);
        f.wrote(10, 5_000);
        f.wrote(10, 600);
        f.client_read(t0, 10);
        assert_eq!(f.lag_bytes(), 0);
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
