//! [`FileSink`]: appends each event's exact JSON bytes plus `\n` to a file.
//!
//! `emit` queues (bounded, two-class, drops counted) and returns; a background thread writes.
//! A forwarded envelope is written byte for byte, so tests and operators can compare what arrived
//! with what left. [`FileSink::flush`] waits until everything emitted before it is on disk
//! (written and `fsync`ed); dropping the sink drains, flushes and joins the thread.

use crate::envelope::Event;
use crate::priority::Priority;
use crate::queue::PriorityQueue;
use crate::sink::{Sink, SinkStats};
use parking_lot::{Condvar, Mutex};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Default queue capacity of a file sink (disk is fast; this absorbs bursts).
pub const DEFAULT_FILE_CAPACITY: usize = 65_536;

/// How often the writer thread looks for events below the wake mark (nobody wakes it for them).
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long [`FileSink::flush`] waits for the writer thread before giving up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct State {
    queue: PriorityQueue,
    flush_requested: u64,
    flush_done: u64,
    last_error: Option<String>,
    stop: bool,
    /// The writer thread has finished (after close): nothing left to wait for.
    exited: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
    flushed: Condvar,
    wake_mark: usize,
    delivered: AtomicU64,
    write_dropped_high: AtomicU64,
    write_dropped_low: AtomicU64,
    write_errors: AtomicU64,
    in_flight: AtomicU64,
}

/// Appends events as JSON lines to a file from a background thread.
#[derive(Debug)]
pub struct FileSink {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl FileSink {
    /// Opens (creating, appending) `path` with the default capacity.
    pub fn create(path: impl AsRef<Path>) -> io::Result<FileSink> {
        FileSink::with_capacity(path, DEFAULT_FILE_CAPACITY)
    }

    /// Opens (creating, appending) `path`; at most `capacity` events wait to be written.
    pub fn with_capacity(path: impl AsRef<Path>, capacity: usize) -> io::Result<FileSink> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: PriorityQueue::new(capacity),
                flush_requested: 0,
                flush_done: 0,
                last_error: None,
                stop: false,
                exited: false,
            }),
            work: Condvar::new(),
            flushed: Condvar::new(),
            wake_mark: crate::queue::wake_mark(capacity),
            delivered: AtomicU64::new(0),
            write_dropped_high: AtomicU64::new(0),
            write_dropped_low: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("telemetry-file-sink".into())
            .spawn(move || write_loop(&worker, BufWriter::with_capacity(256 * 1024, file)))?;
        Ok(FileSink {
            shared,
            thread: Mutex::new(Some(thread)),
            path,
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until every event emitted before this call is written and synced to disk.
    /// Errors if a write failed since the last flush, or the writer did not answer within 30 s.
    pub fn flush(&self) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        st.flush_requested += 1;
        let target = st.flush_requested;
        self.shared.work.notify_one();
        while st.flush_done < target {
            if st.exited {
                break;
            }
            if self
                .shared
                .flushed
                .wait_for(&mut st, FLUSH_TIMEOUT)
                .timed_out()
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "telemetry file sink {}: flush timed out",
                        self.path.display()
                    ),
                ));
            }
        }
        match st.last_error.take() {
            Some(e) => Err(io::Error::other(format!(
                "telemetry file sink {}: {e}",
                self.path.display()
            ))),
            None => Ok(()),
        }
    }

    /// Drains, flushes and stops the writer thread (also done on drop). Later emits are dropped
    /// and counted.
    pub fn close(&self) {
        {
            let mut st = self.shared.state.lock();
            st.stop = true;
            st.queue.close();
        }
        self.shared.work.notify_one();
        if let Some(t) = self.thread.lock().take() {
            if t.join().is_err() {
                tracing::error!(target: "telemetry", "telemetry file sink thread panicked");
            }
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        self.close();
    }
}

impl Sink for FileSink {
    fn emit(&self, event: Event) {
        let pushed = self.shared.state.lock().queue.push(event);
        drop(pushed.dropped_event);
        // Like `EventQueue`: the writer polls; only a filling queue pays for a wake-up.
        if pushed.len == self.shared.wake_mark {
            self.shared.work.notify_one();
        }
    }

    fn stats(&self) -> SinkStats {
        let (q, len) = {
            let st = self.shared.state.lock();
            (st.queue.counts(), st.queue.len())
        };
        let s = &self.shared;
        SinkStats {
            emitted: q.pushed(),
            delivered: s.delivered.load(Ordering::Relaxed),
            dropped_high: q.dropped_high + s.write_dropped_high.load(Ordering::Relaxed),
            dropped_low: q.dropped_low + s.write_dropped_low.load(Ordering::Relaxed),
            queued: len as u64 + s.in_flight.load(Ordering::Relaxed),
            reports: 0,
            write_errors: s.write_errors.load(Ordering::Relaxed),
        }
    }

    fn name(&self) -> &'static str {
        "file"
    }

    fn flush(&self) {
        if let Err(e) = FileSink::flush(self) {
            tracing::warn!(target: "telemetry", error = %e, "telemetry file sink flush failed");
        }
    }
}

fn write_loop(shared: &Shared, mut file: BufWriter<File>) {
    let mut batch: Vec<Event> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut dead: Vec<Event> = Vec::new();
    loop {
        let (flush_target, stop) = {
            let mut st = shared.state.lock();
            while st.queue.is_empty() && !st.stop && st.flush_requested == st.flush_done {
                shared.work.wait_for(&mut st, POLL_INTERVAL);
            }
            st.queue.drain_into(&mut batch);
            st.queue.swap_dead(&mut dead);
            (st.flush_requested, st.stop)
        };
        dead.clear();
        shared
            .in_flight
            .store(batch.len() as u64, Ordering::Relaxed);
        let mut error = None;
        let mut written = 0usize;
        for event in &batch {
            buf.clear();
            event.write_json(&mut buf);
            buf.push(b'\n');
            if let Err(e) = file.write_all(&buf) {
                error = Some(e.to_string());
                break;
            }
            written += 1;
        }
        shared
            .delivered
            .fetch_add(written as u64, Ordering::Relaxed);
        for event in &batch[written..] {
            let c = match event.priority() {
                Priority::High => &shared.write_dropped_high,
                Priority::Low => &shared.write_dropped_low,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        shared.in_flight.store(0, Ordering::Relaxed);
        batch.clear();
        let need_flush = stop || flush_target > shared.state.lock().flush_done;
        if need_flush && error.is_none() {
            if let Err(e) = file.flush().and_then(|()| file.get_ref().sync_data()) {
                error = Some(e.to_string());
            }
        }
        if let Some(e) = &error {
            shared.write_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "telemetry", error = %e, "telemetry file sink write failed; events dropped (counted)");
        }
        {
            let mut st = shared.state.lock();
            if error.is_some() {
                st.last_error = error;
            }
            if need_flush {
                st.flush_done = flush_target;
                shared.flushed.notify_all();
            }
            if stop && st.queue.is_empty() {
                st.exited = true;
                shared.flushed.notify_all();
                return;
            }
        }
    }
}
