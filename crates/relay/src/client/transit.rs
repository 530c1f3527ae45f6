//! Counting what was lost between the runner and this client, exactly.
//!
//! The runner numbers every event line it writes (`{"type":"telemetry","seq":N,...}`, from 1, no
//! hole; see `telemetry::sinks::TrickleEventsSink`). [`Transit`] follows those numbers:
//!
//! - the next line should carry the next number; a jump is a **gap**: lines lost in transit
//!   (a skipped segment, the rest of a segment that broke off and could not be resumed, ...), the
//!   exact count and range;
//! - a new runner starts again at 1: `runner_ready` announces it, so a line numbered 1 after it is
//!   a **restart**, not a gap (and a missed `runner_ready` still shows as a number going *down*);
//! - the runner's `telemetry_end {last_seq}`, written before it closes the channel, shows a lost
//!   **tail**;
//! - the runner's own loss reports (`telemetry_dropped`) are not numbered; they carry
//!   `report_seq` and a cumulative `dropped_total`, so a report lost in transit costs nothing:
//!   the next one (or `telemetry_end`) brings its count. Of `dropped_total`, `lost_downstream_total`
//!   counts lines the runner's writer lost after handing them on (an upper bound, other lines
//!   included): those events show here as gaps, exactly, so they are not counted twice.
//!
//! Lines without `seq` (Scope's own runner, the seed) are relayed as before and not followed.
//!
//! Each gap becomes one `telemetry_lost_in_transit` envelope downstream (built by the client,
//! metadata `lost`, `seq_from`, `seq_to`, `reason`, `lost_total`), so whoever reads the egress can
//! close its sums: `emitted = delivered + dropped + lost_in_transit`.

/// Lines a gap covers, and why they are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// First missing `seq`.
    pub from: u64,
    /// Last missing `seq`.
    pub to: u64,
    /// Why: `skipped` (a jump ahead), `tail` (lines after the last one read, announced by
    /// `telemetry_end`), `before_first` (the first line read was not 1), `restart` (a new runner
    /// whose first lines were missed).
    pub reason: &'static str,
}

impl Gap {
    /// Lines missing.
    pub fn lost(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// The numbering followed so far (one client, any number of runners one after another).
#[derive(Debug, Default, Clone)]
pub struct Transit {
    /// The next `seq` expected; `None` before the first numbered line.
    expected: Option<u64>,
    /// `runner_ready` seen: the next numbered line starts a new run at 1.
    new_run: bool,
    /// A numbered line was seen since the last `runner_ready` (a run is under way).
    in_run: bool,
    /// Event lines lost in transit, in all.
    pub lost: u64,
    /// Gaps found.
    pub gaps: u64,
    /// New runners (after the first).
    pub restarts: u64,
    /// Drops the runner reported (its real drops: `dropped_total` less `lost_downstream_total`).
    pub dropped_reported: u64,
    /// Loss reports that did not arrive (their counts came with a later one).
    pub lost_reports: u64,
    /// This run's last `dropped_total` / `lost_downstream_total` / `report_seq`.
    run_dropped: u64,
    run_report_seq: u64,
    /// `telemetry_end` seen for the current run.
    pub ended: bool,
}

impl Transit {
    /// `runner_ready`: the numbered lines after it belong to a new runner.
    pub fn runner_ready(&mut self) {
        if self.in_run {
            self.restarts += 1;
        }
        self.new_run = true;
        self.in_run = false;
        self.ended = false;
        self.run_dropped = 0;
        self.run_report_seq = 0;
    }

    /// The last `seq` read (0: none).
    pub fn read_seq(&self) -> u64 {
        self.expected.map_or(0, |e| e - 1)
    }

    /// Whether any numbered line was read: the runner numbers its lines.
    pub fn numbered(&self) -> bool {
        self.expected.is_some()
    }

    /// A line numbered `seq` arrived; returns the gap it reveals, if any.
    pub fn line(&mut self, seq: u64) -> Option<Gap> {
        let expected = if std::mem::take(&mut self.new_run) {
            Some(1)
        } else {
            self.expected
        };
        self.in_run = true;
        let gap = match expected {
            None if seq > 1 => Some((1, "before_first")),
            None => None,
            Some(e) if seq == e => None,
            Some(e) if seq > e => Some((e, "skipped")),
            Some(_) => {
                // Numbers went down without a `runner_ready` (lost): a new runner.
                self.restarts += 1;
                self.run_dropped = 0;
                self.run_report_seq = 0;
                self.ended = false;
                (seq > 1).then_some((1, "restart"))
            }
        };
        self.expected = Some(seq + 1);
        gap.map(|(from, reason)| {
            self.count(Gap {
                from,
                to: seq - 1,
                reason,
            })
        })
    }

    /// `telemetry_end {last_seq}`: the runner wrote nothing after `last_seq`; returns the lost
    /// tail, if any.
    pub fn end(&mut self, last_seq: u64) -> Option<Gap> {
        self.ended = true;
        let next = if self.new_run {
            1
        } else {
            self.expected.unwrap_or(1)
        };
        if last_seq < next {
            return None;
        }
        self.new_run = false;
        self.in_run = true;
        self.expected = Some(last_seq + 1);
        Some(self.count(Gap {
            from: next,
            to: last_seq,
            reason: "tail",
        }))
    }

    /// A loss report (or `telemetry_end`) of this run: its `report_seq` (reports written so far,
    /// when it has one), `dropped_total` and `lost_downstream_total`. Returns the drops newly
    /// reported.
    pub fn report(
        &mut self,
        report_seq: Option<u64>,
        dropped_total: u64,
        lost_downstream_total: u64,
    ) -> u64 {
        if let Some(r) = report_seq {
            if r > self.run_report_seq + 1 {
                self.lost_reports += r - self.run_report_seq - 1;
            }
            self.run_report_seq = self.run_report_seq.max(r);
        }
        let real = dropped_total.saturating_sub(lost_downstream_total);
        let new = real.saturating_sub(self.run_dropped);
        self.run_dropped = self.run_dropped.max(real);
        self.dropped_reported += new;
        new
    }

    /// `telemetry_end`'s `reports`: every report this run wrote; the ones missing were lost.
    pub fn reports_written(&mut self, reports: u64) {
        if reports > self.run_report_seq {
            self.lost_reports += reports - self.run_report_seq;
            self.run_report_seq = reports;
        }
    }

    fn count(&mut self, gap: Gap) -> Gap {
        self.lost += gap.lost();
        self.gaps += 1;
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_lines_have_no_gap() {
        let mut t = Transit::default();
        for s in 1..=100 {
            assert_eq!(t.line(s), None);
        }
        assert_eq!((t.lost, t.gaps, t.read_seq()), (0, 0, 100));
    }

    #[test]
    fn a_jump_is_an_exact_gap() {
        let mut t = Transit::default();
        t.line(1);
        t.line(2);
        let g = t.line(10).unwrap();
        assert_eq!((g.from, g.to, g.lost(), g.reason), (3, 9, 7, "skipped"));
        t.line(11);
        let g = t.line(13).unwrap();
        assert_eq!(g.lost(), 1);
        assert_eq!((t.lost, t.gaps), (8, 2));
    }

    #[test]
    fn starting_late_counts_the_lines_before() {
        let mut t = Transit::default();
        let g = t.line(5).unwrap();
        assert_eq!((g.from, g.to, g.reason), (1, 4, "before_first"));
    }

    #[test]
    fn a_restart_announced_by_runner_ready_is_no_gap() {
        let mut t = Transit::default();
        for s in 1..=50 {
            t.line(s);
        }
        t.runner_ready();
        assert_eq!(t.line(1), None);
        assert_eq!(t.line(2), None);
        assert_eq!((t.lost, t.restarts), (0, 1));
        // The first runner_ready of all is no restart.
        let mut fresh = Transit::default();
        fresh.runner_ready();
        assert_eq!(fresh.line(1), None);
        assert_eq!(fresh.restarts, 0);
    }

    #[test]
    fn a_restart_whose_runner_ready_was_lost_shows_as_numbers_going_down() {
        let mut t = Transit::default();
        for s in 1..=50 {
            t.line(s);
        }
        assert_eq!(t.line(1), None);
        assert_eq!(t.restarts, 1);
        for s in 2..=10 {
            t.line(s);
        }
        let g = t.line(4).unwrap();
        assert_eq!((g.from, g.to, g.reason), (1, 3, "restart"));
        assert_eq!(t.restarts, 2);
    }

    #[test]
    fn the_end_marker_shows_a_lost_tail() {
        let mut t = Transit::default();
        t.line(1);
        t.line(2);
        assert_eq!(t.end(2), None);
        let mut t = Transit::default();
        t.line(1);
        let g = t.end(9).unwrap();
        assert_eq!((g.from, g.to, g.reason), (2, 9, "tail"));
        assert_eq!(t.lost, 8);
    }

    #[test]
    fn a_lost_report_costs_nothing_its_count_comes_with_the_next() {
        let mut t = Transit::default();
        assert_eq!(t.report(Some(1), 10, 0), 10);
        // Report 2 (dropped_total 25) was lost in transit.
        assert_eq!(t.report(Some(3), 40, 0), 30);
        assert_eq!((t.dropped_reported, t.lost_reports), (40, 1));
        t.reports_written(4);
        assert_eq!(t.lost_reports, 2);
        // Lines the writer lost are gaps here, not drops.
        assert_eq!(t.report(Some(5), 47, 5), 2);
        assert_eq!(t.dropped_reported, 42);
        // A new runner counts from zero again.
        t.runner_ready();
        assert_eq!(t.report(Some(1), 3, 0), 3);
        assert_eq!(t.dropped_reported, 45);
    }
}
