//! The driver against a scripted service, model-based (as vector-buffers tests its buffers):
//! proptest draws a script of answers in any order (delivered, dropped, retry with and without
//! a wait, split, pause, partial deliveries, "delivered but retry") and a run of actions (emit,
//! crash, resume), runs them against a real driver over a real disk buffer, and checks the
//! driver's promises against what the service saw:
//!
//! - nothing accepted is lost: every emitted event is delivered, dropped by the service, or
//!   counted as dropped by the driver (handoff, cap, spool);
//! - nothing is delivered twice, except where the service said so ("delivered" answered as
//!   "retry"), or a crash cut a batch the service had resolved record by record;
//! - every drop is counted: the service's drops match the driver's counter for that reason, and
//!   each run conserves `emitted + reports + recovered == delivered + dropped + buffered`.
//!
//! A crash here stops the driver without a flush (`shutdown(0)`): the handoff queue is stored,
//! the in-hand batch is not resolved, memory would be lost (this test buffers on disk). A
//! `kill -9` between a delivery and its removal is covered by the process tests of the reporter
//! (`crates/trickle-relay/tests/http_egress.rs`) and the spool.

use egress::{Batch, Cap, Cx, Driver, DriverConfig, Encoder, Outcome, Reason, Service};
use parking_lot::Mutex;
use proptest::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use telemetry::{Envelope, Event, Fields, Sink};

/// The service's refusal: counted, not reported (the destination knows).
const REFUSED: Reason = Reason {
    name: "refused",
    reported: false,
};
const DROPS: &[Reason] = &[REFUSED, Reason::OVERSIZE];

/// One scripted answer of the service.
#[derive(Debug, Clone, Copy)]
enum Step {
    Deliver,
    /// The destination took the batch but answered "retry": it may arrive twice.
    DeliverThenRetry,
    Retry,
    RetryAfter,
    Drop,
    Split,
    Pause,
    /// Delivers the first `k` pending records one by one, then asks to retry the rest.
    Partial(usize),
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Emit(usize),
    Crash,
    Resume,
    Wait,
}

/// What the service saw, across every run of the driver.
#[derive(Default)]
struct Log {
    script: VecDeque<Step>,
    /// Every delivery, in order (an id may repeat): the id, the run of the driver, and whether
    /// it was delivered record by record.
    delivered: Vec<(String, usize, bool)>,
    /// Every id the service dropped.
    dropped: Vec<String>,
    /// Ids the service delivered but answered "retry": allowed to arrive more than once.
    dup_ok: HashSet<String>,
    /// Runs of the driver so far.
    run: usize,
}

/// Stores `type \n id`.
struct TypeAndId;

impl Encoder for TypeAndId {
    fn encode(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), &'static Reason> {
        out.extend_from_slice(event.event_type().unwrap_or("?").as_bytes());
        out.push(b'\n');
        out.extend_from_slice(event.id().as_bytes());
        Ok(())
    }
}

fn id_of(record: &[u8]) -> String {
    let text = String::from_utf8_lossy(record);
    text.split_once('\n').map_or("", |(_, id)| id).to_owned()
}

struct Scripted {
    log: Arc<Mutex<Log>>,
}

impl Service for Scripted {
    async fn send(&mut self, batch: &mut Batch, _cx: &Cx<'_>) -> Outcome {
        let mut log = self.log.lock();
        let step = log.script.pop_front().unwrap_or(Step::Deliver);
        let pending: Vec<usize> = batch.pending().collect();
        let ids: Vec<String> = pending.iter().map(|&i| id_of(batch.record(i))).collect();
        match step {
            Step::Deliver => {
                let run = log.run;
                log.delivered
                    .extend(ids.into_iter().map(|id| (id, run, false)));
                Outcome::Delivered
            }
            Step::DeliverThenRetry => {
                let run = log.run;
                log.delivered
                    .extend(ids.iter().map(|id| (id.clone(), run, false)));
                log.dup_ok.extend(ids);
                Outcome::Retry(None)
            }
            Step::Retry => Outcome::Retry(None),
            Step::RetryAfter => Outcome::Retry(Some(Duration::from_millis(1))),
            Step::Drop => {
                log.dropped.extend(ids);
                Outcome::Dropped(&REFUSED)
            }
            Step::Split => Outcome::Split,
            Step::Pause => Outcome::Pause,
            Step::Partial(k) => {
                let run = log.run;
                for (&i, id) in pending.iter().zip(ids).take(k) {
                    batch.deliver(i);
                    log.delivered.push((id, run, true));
                }
                Outcome::Retry(None)
            }
        }
    }
}

fn config(dir: &Path, cap: usize) -> DriverConfig {
    DriverConfig {
        sink: "model",
        display: "model sink",
        buffer_setting: "MODEL_BUFFER_PATH",
        buffer_path: Some(dir.to_path_buf()),
        spool: spool::SpoolOptions::default(),
        cap: Cap::Buffered(cap),
        handoff_capacity: 64,
        disk_retry: Duration::from_millis(10),
        report_interval: Duration::from_millis(5),
        flush_interval: Duration::from_millis(2),
        flush_timeout: Duration::from_secs(10),
        max_batch: 4,
        max_batch_bytes: 1 << 20,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(4),
        drops: DROPS,
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Deliver),
        1 => Just(Step::DeliverThenRetry),
        2 => Just(Step::Retry),
        1 => Just(Step::RetryAfter),
        2 => Just(Step::Drop),
        2 => Just(Step::Split),
        1 => Just(Step::Pause),
        2 => (1usize..4).prop_map(Step::Partial),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (1usize..40).prop_map(Action::Emit),
        2 => Just(Action::Crash),
        1 => Just(Action::Resume),
        2 => Just(Action::Wait),
    ]
}

/// Counters summed over every run of the driver.
#[derive(Debug, Default)]
struct Totals {
    refused: u64,
    lost_locally: u64,
    reports: u64,
}

/// Ends a run: `shutdown(timeout)` (zero: a crash), checks the run's conservation, adds its
/// counters; returns what it left on disk.
fn end_run(driver: Driver, timeout: Duration, totals: &mut Totals, log: &Mutex<Log>) -> u64 {
    let s = driver.shutdown(timeout);
    drop(driver);
    assert_eq!(
        s.handoff_pending, 0,
        "the writer stored the handoff queue: {s:?}"
    );
    assert_eq!(
        s.emitted + s.reports + s.recovered,
        s.delivered + s.dropped() + s.buffered,
        "a run conserves every event: {s:?}"
    );
    totals.refused += s.dropped_by(REFUSED.name);
    totals.lost_locally += s.dropped_handoff + s.dropped_buffer_full + s.dropped_spool;
    totals.reports += s.reports;
    log.lock().run += 1;
    s.buffered_disk
}

fn run_model(script: Vec<Step>, actions: Vec<Action>, cap: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(Mutex::new(Log {
        script: script.into(),
        ..Log::default()
    }));
    let start = || {
        let service = Scripted {
            log: Arc::clone(&log),
        };
        Driver::start(config(dir.path(), cap), TypeAndId, service).expect("driver starts")
    };
    let mut totals = Totals::default();
    let mut emitted: Vec<String> = Vec::new();
    let mut driver = start();
    let mut left = 0;
    for action in actions {
        match action {
            Action::Emit(n) => {
                for i in 0..n {
                    let e = Event::Built(Box::new(Envelope::new(
                        "model_event",
                        Fields::new().meta("i", i as u64),
                    )));
                    emitted.push(e.id().into_owned());
                    driver.emit(e);
                }
            }
            Action::Crash => {
                let recovered_expected = end_run(driver, Duration::ZERO, &mut totals, &log);
                driver = start();
                assert_eq!(driver.driver_stats().recovered, recovered_expected);
            }
            Action::Resume => driver.resume(),
            Action::Wait => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    // Heal: the script runs out (every later answer delivers); drain until nothing is left on
    // disk (a run's final loss report is stored as it stops, and sent by the next).
    for _ in 0..5 {
        log.lock().script.clear();
        driver.resume();
        left = end_run(driver, Duration::from_secs(10), &mut totals, &log);
        driver = start();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "everything drained");
    end_run(driver, Duration::from_secs(10), &mut totals, &log);

    let log = log.lock();
    let mut times: HashMap<&str, (usize, bool)> = HashMap::new();
    for (id, run, partial) in &log.delivered {
        if let Some((prev_run, prev_partial)) = times.insert(id.as_str(), (*run, *partial)) {
            // Again: the service said "retry" after delivering it, or a crash (a later run) cut
            // the batch it was delivered from record by record (removed only once complete).
            assert!(
                log.dup_ok.contains(id) || (prev_partial && *run > prev_run),
                "{id} delivered twice (runs {prev_run} and {run}) without the service saying so"
            );
        }
    }
    let dropped: HashSet<&str> = log.dropped.iter().map(String::as_str).collect();
    assert_eq!(dropped.len(), log.dropped.len(), "an id dropped twice");
    // A record the cap dropped while the service held it is counted once, as the cap's drop.
    let refused_seen = log.dropped.len() as u64;
    assert!(
        totals.refused <= refused_seen && refused_seen <= totals.refused + totals.lost_locally,
        "every service drop counted once: {totals:?}, the service dropped {refused_seen}"
    );
    let seen = |id: &str| times.contains_key(id) || dropped.contains(id);
    let lost = emitted.iter().filter(|id| !seen(id)).count() as u64;
    let reports_seen = times
        .keys()
        .chain(dropped.iter())
        .filter(|id| !emitted.iter().any(|e| e == **id))
        .count() as u64;
    let unaccounted = lost + totals.reports.saturating_sub(reports_seen);
    // Every event neither delivered nor refused is a counted local drop. (Not the converse: the
    // cap may drop a record while the service is delivering it; it is counted as dropped once,
    // and arrives anyway.)
    assert!(
        unaccounted <= totals.lost_locally,
        "events lost without being counted: {unaccounted} unaccounted, {totals:?}"
    );
    if totals.lost_locally == 0 {
        assert_eq!(lost, 0, "nothing accepted is lost");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn driver_keeps_its_promises_whatever_the_service_answers(
        script in proptest::collection::vec(step(), 0..30),
        actions in proptest::collection::vec(action(), 1..14),
        cap in prop_oneof![Just(10_000usize), 20usize..60],
    ) {
        run_model(script, actions, cap);
    }
}

#[test]
fn a_script_of_every_answer_in_turn_loses_nothing() {
    use Step::*;
    let script = vec![
        Retry,
        Split,
        Partial(1),
        DeliverThenRetry,
        Drop,
        Pause,
        RetryAfter,
        Partial(3),
        Deliver,
    ];
    let actions = vec![
        Action::Emit(30),
        Action::Wait,
        Action::Resume,
        Action::Crash,
        Action::Emit(10),
        Action::Resume,
    ];
    run_model(script, actions, 10_000);
}
