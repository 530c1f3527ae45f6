//! The bounded two-class queue: policy, order, counts, and concurrent producers.

use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use telemetry::queue::{EventQueue, PriorityQueue};
use telemetry::{Envelope, Event, Fields, Priority};

fn ev(kind: Priority, n: u64) -> Event {
    let t = match kind {
        Priority::High => "stream_started",
        Priority::Low => "stream_heartbeat",
    };
    Event::from(Envelope::new(t, Fields::new().meta("n", n)))
}

fn n_of(e: &Event) -> u64 {
    match e {
        Event::Built(b) => b.fields().get_meta("n").and_then(|v| v.as_u64()).unwrap(),
        Event::Raw(_) => unreachable!(),
    }
}

#[test]
fn full_queue_drops_oldest_low_first() {
    let mut q = PriorityQueue::new(4);
    q.push(ev(Priority::Low, 0));
    q.push(ev(Priority::High, 1));
    q.push(ev(Priority::Low, 2));
    q.push(ev(Priority::High, 3));
    // Full: a new High evicts the oldest Low (0), a new Low evicts the next oldest Low (2).
    assert_eq!(q.push(ev(Priority::High, 4)).dropped, Some(Priority::Low));
    assert_eq!(q.push(ev(Priority::Low, 5)).dropped, Some(Priority::Low));
    let mut out = Vec::new();
    assert_eq!(q.drain_into(&mut out), 4);
    assert_eq!(out.iter().map(n_of).collect::<Vec<_>>(), [1, 3, 4, 5]);
    let c = q.counts();
    assert_eq!((c.dropped_high, c.dropped_low), (0, 2));
}

#[test]
fn new_low_is_refused_when_full_of_high() {
    let mut q = PriorityQueue::new(2);
    q.push(ev(Priority::High, 0));
    q.push(ev(Priority::High, 1));
    let p = q.push(ev(Priority::Low, 2));
    assert_eq!(p.dropped, Some(Priority::Low));
    assert_eq!(q.len_high(), 2);
    // A new High when full of High evicts the oldest High.
    let p = q.push(ev(Priority::High, 3));
    assert_eq!(p.dropped, Some(Priority::High));
    let mut out = Vec::new();
    q.drain_into(&mut out);
    assert_eq!(out.iter().map(n_of).collect::<Vec<_>>(), [1, 3]);
    // The dropped events wait for the consumer to free them, off the caller's thread.
    let mut dead = Vec::new();
    q.swap_dead(&mut dead);
    assert_eq!(dead.iter().map(n_of).collect::<Vec<_>>(), [2, 0]);
    let c = q.counts();
    assert_eq!(
        (c.pushed_high, c.pushed_low, c.dropped_high, c.dropped_low),
        (3, 1, 1, 1)
    );
}

#[test]
fn dead_list_is_bounded_then_hands_drops_back() {
    let mut q = PriorityQueue::new(2);
    let mut handed_back = 0;
    for i in 0..10 {
        if q.push(ev(Priority::Low, i)).dropped_event.is_some() {
            handed_back += 1;
        }
    }
    // 8 drops: the first 2 wait in the dead list (capacity 2), the other 6 go back to the caller.
    assert_eq!(q.counts().dropped_low, 8);
    assert_eq!(handed_back, 6);
    let mut dead = Vec::new();
    q.swap_dead(&mut dead);
    assert_eq!(dead.len(), 2);
}

#[test]
fn closed_queue_refuses_and_counts() {
    let mut q = PriorityQueue::new(8);
    q.push(ev(Priority::High, 0));
    q.close();
    assert_eq!(q.push(ev(Priority::High, 1)).dropped, Some(Priority::High));
    assert_eq!(q.push(ev(Priority::Low, 2)).dropped, Some(Priority::Low));
    let mut out = Vec::new();
    assert_eq!(q.drain_into(&mut out), 1);
    let c = q.counts();
    assert_eq!(c.pushed(), 3);
    assert_eq!(c.dropped(), 2);
    assert_eq!(c.taken(), 1);
}

#[derive(Debug, Clone)]
enum Op {
    Push(bool),
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![8 => any::<bool>().prop_map(Op::Push), 1 => Just(Op::Drain)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn policy_and_counts_hold_for_any_sequence(
        cap in 1usize..12, ops in prop::collection::vec(op(), 0..300)
    ) {
        let mut q = PriorityQueue::new(cap);
        let mut next = 0u64;
        let mut delivered: Vec<Event> = Vec::new();
        for o in ops {
            match o {
                Op::Push(high) => {
                    let class = if high { Priority::High } else { Priority::Low };
                    let lows_before = q.len_low();
                    let full_before = q.len() >= cap;
                    let p = q.push(ev(class, next));
                    next += 1;
                    prop_assert!(q.len() <= cap);
                    match p.dropped {
                        None => prop_assert!(!full_before),
                        // High is never dropped while a Low is queued.
                        Some(Priority::High) => {
                            prop_assert!(full_before && lows_before == 0 && class == Priority::High)
                        }
                        Some(Priority::Low) => prop_assert!(full_before),
                    }
                    prop_assert!(p.dropped_event.is_none() || p.dropped.is_some());
                }
                Op::Drain => { q.drain_into(&mut delivered); }
            }
        }
        q.drain_into(&mut delivered);
        let c = q.counts();
        // Drops counted == pushed - delivered.
        prop_assert_eq!(c.pushed(), next);
        prop_assert_eq!(c.dropped(), c.pushed() - delivered.len() as u64);
        prop_assert_eq!(c.taken(), delivered.len() as u64);
        // Delivered in push order.
        let ns: Vec<u64> = delivered.iter().map(n_of).collect();
        prop_assert!(ns.windows(2).all(|w| w[0] < w[1]), "{:?}", ns);
    }
}

#[test]
fn four_threads_emit_without_blocking_and_counts_add_up() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let q = Arc::new(EventQueue::new(256));
    const PER_THREAD: u64 = 20_000;
    // A consumer that drains concurrently, as a sink's drain task does.
    let consumer = {
        let q = Arc::clone(&q);
        rt.spawn(async move {
            let mut total = 0u64;
            let mut buf = Vec::new();
            loop {
                let d = q.drain_into(&mut buf);
                total += d.taken as u64;
                buf.clear();
                if d.closed {
                    return total;
                }
                if d.taken == 0 {
                    let _ = tokio::time::timeout(Duration::from_millis(50), q.wait()).await;
                }
            }
        })
    };
    let producers: Vec<_> = (0..4)
        .map(|t| {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let class = if i % 10 == 0 {
                        Priority::High
                    } else {
                        Priority::Low
                    };
                    q.push(ev(class, t * PER_THREAD + i));
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    q.close();
    let taken = rt.block_on(consumer).unwrap();
    let c = q.counts();
    assert_eq!(c.pushed(), 4 * PER_THREAD);
    assert_eq!(c.pushed_high, 4 * PER_THREAD / 10);
    assert_eq!(c.taken(), taken);
    assert_eq!(c.pushed(), c.taken() + c.dropped());
    assert!(q.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_push_after_the_consumer_parks_wakes_it_at_once() {
    let q = Arc::new(EventQueue::new(256).with_min_idle(Duration::ZERO));
    // The consumer parks with a poll far longer than the test: only a push can wake it.
    let consumer = {
        let q = Arc::clone(&q);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut rounds = 0;
            while buf.len() < 3 {
                q.drain_into(&mut buf);
                if buf.len() < 3 {
                    q.wait_idle(Duration::from_secs(3600)).await;
                }
                rounds += 1;
            }
            (buf.len(), rounds)
        })
    };
    // Each time it has parked, one push must wake it, long before its poll.
    for i in 0..3u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !q.is_parked() {
            assert!(
                std::time::Instant::now() < deadline,
                "consumer never parked"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        q.push(ev(Priority::Low, i));
        assert_eq!(q.wakes(), i + 1, "push {i} woke the parked consumer");
    }
    let (taken, _) = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("consumer woke without waiting for its poll")
        .unwrap();
    assert_eq!(taken, 3);
}

#[test]
fn pushes_while_the_consumer_is_busy_send_no_wake_up() {
    let q = EventQueue::new(256);
    // Nobody parked: pushes below the wake mark never wake anyone (no syscall for the caller).
    for i in 0..q.wake_mark() as u64 - 1 {
        q.push(ev(Priority::Low, i));
    }
    assert_eq!(q.wakes(), 0);
    // The wake mark still wakes a polling consumer.
    q.push(ev(Priority::Low, 999));
    assert_eq!(q.wakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_returns_at_once_when_something_is_queued() {
    let q = EventQueue::new(16);
    q.push(ev(Priority::High, 1));
    tokio::time::timeout(
        Duration::from_secs(10),
        q.wait_idle(Duration::from_secs(3600)),
    )
    .await
    .expect("returned without parking");
    assert_eq!(q.wakes(), 0, "not parked, so the push sent no wake-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_sooner_than_min_idle_after_parking_leaves_the_event_to_the_poll() {
    // Parked for less than `min_idle`: the producer does not pay for a wake-up; the consumer
    // still gets the event at its poll (nothing is lost, it is only batched).
    let q = Arc::new(EventQueue::new(256).with_min_idle(Duration::from_secs(3600)));
    let consumer = {
        let q = Arc::clone(&q);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while buf.is_empty() {
                q.wait_idle(Duration::from_millis(50)).await;
                q.drain_into(&mut buf);
            }
            buf.len()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !q.is_parked() {
        assert!(
            std::time::Instant::now() < deadline,
            "consumer never parked"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    q.push(ev(Priority::Low, 1));
    assert_eq!(q.wakes(), 0, "no wake-up within min_idle");
    let taken = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("the poll delivered it")
        .unwrap();
    assert_eq!(taken, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_idle_over_several_polls_is_woken_by_the_next_push() {
    // Polls (20 ms) shorter than min_idle (200 ms): an idle consumer parks again and again. It
    // has been idle since its first park, so once min_idle has passed a push wakes it at once.
    let q = Arc::new(EventQueue::new(256).with_min_idle(Duration::from_millis(200)));
    let consumer = {
        let q = Arc::clone(&q);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut polls = 0u32;
            while buf.is_empty() {
                q.wait_idle(Duration::from_millis(20)).await;
                polls += 1;
                q.drain_into(&mut buf);
            }
            polls
        })
    };
    // Well past min_idle, over a dozen polls.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(q.is_parked(), "an idle consumer stays announced as parked");
    q.push(ev(Priority::Low, 1));
    assert_eq!(
        q.wakes(),
        1,
        "the push woke the consumer that was idle for > min_idle"
    );
    let polls = tokio::time::timeout(Duration::from_secs(20), consumer)
        .await
        .expect("the consumer took the event")
        .unwrap();
    assert!(polls > 5, "it polled while idle ({polls} polls)");
}
