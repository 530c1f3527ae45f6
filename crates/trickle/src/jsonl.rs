//! JSON-lines channels (control and events): one JSON object per line, UTF-8, `\n`-terminated.
//!
//! - [`JsonlWriter`] keeps one segment open and writes each line into it at once. It rotates to a
//!   new segment every [`JsonlWriterOptions::rotate_every`] (10 s), as soon as the open segment
//!   would outgrow [`JsonlWriterOptions::max_segment_bytes`] (1 MiB; the Python reader caps whole
//!   segments, so an unbounded segment would make it abort), and on close. All lines queued since
//!   its last write go out as ONE chunk, so many small lines cost one HTTP chunk.
//! - [`JsonlReader`] yields each line as soon as it is complete (it never waits for a segment to
//!   end) and never holds more than one line in memory. A bad line (not UTF-8, not JSON, not an
//!   object, over [`JsonlReaderOptions::max_line_bytes`]) is counted by kind, logged (rate-limited)
//!   and skipped; reading continues. The reference Python reader aborts instead; we must not.
//! - Segments are independent: a line never spans two segments. A segment that ends without a final
//!   `\n` (a publisher that died mid-line) has its tail decoded like any line: a complete object is
//!   delivered (counted as `unterminated`), anything else is counted as a `partial` bad line.
//!   Blank lines are skipped silently.
//! - [`decode_line`] and [`LineSplitter`] are the pure decoding steps, public for fuzzers.

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::publisher::{PublishError, Publisher, SegmentWriter};
use crate::subscriber::{SegmentReader, SubscribeError, Subscriber, SubscriberStats};

/// MIME type of JSONL channels.
pub const JSONL_CONTENT_TYPE: &str = "application/jsonl";

/// Largest chunk the writer builds from queued lines before writing it (keeps chunks streaming).
const MAX_BATCH_BYTES: usize = 256 << 10;

/// Minimum interval between two warnings about bad lines.
const WARN_EVERY: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Pure decoding: lines and their errors
// ---------------------------------------------------------------------------------------------

/// Why one line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Longer than the limit.
    #[error("line of {len} bytes exceeds the {max}-byte limit")]
    Oversize {
        /// Its length (at least; bytes past the limit are not kept).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// Valid UTF-8 but not a JSON object (first non-space byte is not `{`).
    #[error("line is not a JSON object")]
    NotObject,
    /// Starts like an object but is not valid JSON.
    #[error("line is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON object, but not the shape the caller asked for.
    #[error("line does not match the expected message: {0}")]
    Mismatch(String),
}

/// Decodes one line (without its `\n`; a trailing `\r` is tolerated) into `T`.
pub fn decode_line<T: DeserializeOwned>(line: &[u8], max: usize) -> Result<T, LineError> {
    if line.len() > max {
        return Err(LineError::Oversize {
            len: line.len(),
            max,
        });
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    if text
        .bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        != Some(b'{')
    {
        return Err(LineError::NotObject);
    }
    serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            LineError::Mismatch(e.to_string())
        } else {
            LineError::NotJson(e.to_string())
        }
    })
}

/// `line` without a trailing `\r` (a CRLF line ending), as [`decode_line`] reads it.
fn strip_cr(mut line: Bytes) -> Bytes {
    if line.last() == Some(&b'\r') {
        line.truncate(line.len() - 1);
    }
    line
}

/// Appends valid JSON text to `out` without the whitespace outside strings: key order and every
/// value's spelling are kept, unlike a parse and re-encode (how `subscribe --jsonl` prints a line).
pub fn compact_json(json: &str, out: &mut Vec<u8>) {
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
}

/// What a [`LineSplitter`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitEvent {
    /// A complete line, without its `\n`.
    Line(Bytes),
    /// A line longer than the limit was skipped (its bytes were discarded, never buffered).
    Oversize {
        /// Bytes skipped.
        len: usize,
    },
    /// The stream ended in the middle of a line; this is its beginning (from [`LineSplitter::finish`]).
    Unterminated(Bytes),
}

/// Splits a stream of chunks into lines, holding at most one partial line (≤ the limit).
///
/// Use: [`push`](LineSplitter::push) a chunk, take [`next_event`](LineSplitter::next_event) until
/// `None`, push the next chunk; at the end of the stream call [`finish`](LineSplitter::finish).
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    /// The unread rest of the current chunk.
    pending: Bytes,
    /// The beginning of a line whose `\n` has not arrived yet.
    partial: BytesMut,
    /// Skipping an oversize line until its `\n`.
    discarding: bool,
    discarded: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max_line_bytes` (without the `\n`).
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            max: max_line_bytes,
            pending: Bytes::new(),
            partial: BytesMut::new(),
            discarding: false,
            discarded: 0,
        }
    }

    /// Feeds the next chunk of the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if self.pending.is_empty() {
            self.pending = chunk;
        } else {
            let mut joined = BytesMut::with_capacity(self.pending.len() + chunk.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&chunk);
            self.pending = joined.freeze();
        }
    }

    /// The next line (or oversize skip) in what was pushed; `None` when more input is needed.
    pub fn next_event(&mut self) -> Option<SplitEvent> {
        loop {
            if self.pending.is_empty() {
                return None;
            }
            let Some(i) = memchr::memchr(b'\n', &self.pending) else {
                let rest = std::mem::take(&mut self.pending);
                if self.discarding {
                    self.discarded += rest.len();
                } else if self.partial.len() + rest.len() > self.max {
                    self.discarding = true;
                    self.discarded = self.partial.len() + rest.len();
                    self.partial = BytesMut::new();
                } else {
                    self.partial.extend_from_slice(&rest);
                }
                return None;
            };
            let mut piece = self.pending.split_to(i + 1);
            piece.truncate(i);
            if self.discarding {
                self.discarding = false;
                let len = self.discarded + piece.len();
                self.discarded = 0;
                return Some(SplitEvent::Oversize { len });
            }
            let line = if self.partial.is_empty() {
                piece
            } else {
                let len = self.partial.len() + piece.len();
                if len > self.max {
                    self.partial = BytesMut::new();
                    return Some(SplitEvent::Oversize { len });
                }
                self.partial.extend_from_slice(&piece);
                self.partial.split().freeze()
            };
            if line.len() > self.max {
                return Some(SplitEvent::Oversize { len: line.len() });
            }
            if is_blank(&line) {
                continue;
            }
            return Some(SplitEvent::Line(line));
        }
    }

    /// Ends the stream: whatever is left after the last `\n` (call after `next_event` gave `None`).
    pub fn finish(&mut self) -> Option<SplitEvent> {
        while self.next_event().is_some() {
            // Misuse (events left unread); they are dropped, never mixed into the tail.
        }
        if self.discarding {
            self.discarding = false;
            let len = std::mem::take(&mut self.discarded);
            return Some(SplitEvent::Oversize { len });
        }
        let tail = self.partial.split().freeze();
        self.partial = BytesMut::new();
        if tail.is_empty() || is_blank(&tail) {
            None
        } else {
            Some(SplitEvent::Unterminated(tail))
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Options of a [`JsonlWriter`].
#[derive(Debug, Clone)]
pub struct JsonlWriterOptions {
    /// Close the open segment and start the next after this long (time-windowed rotation).
    pub rotate_every: Duration,
    /// Rotate before a segment would outgrow this many bytes (a single larger line gets its own).
    pub max_segment_bytes: usize,
    /// Lines queued ahead of the writer task; `write_line` / `write_chunk` wait when it is full
    /// (backpressure). Counted in lines, however they were queued.
    pub queue_capacity: usize,
}

impl Default for JsonlWriterOptions {
    fn default() -> Self {
        JsonlWriterOptions {
            rotate_every: Duration::from_secs(10),
            max_segment_bytes: 1 << 20,
            queue_capacity: 8192,
        }
    }
}

/// Why a JSONL write or close failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JsonlError {
    /// The line contains a `\n` (it would become two lines); send compact JSON.
    #[error("a JSONL line may not contain a newline: serialize it compactly")]
    Newline,
    /// The line is empty.
    #[error("a JSONL line may not be empty")]
    Empty,
    /// A chunk given to [`JsonlWriter::write_chunk`] does not end with `\n`.
    #[error("a JSONL chunk must end with a newline (each of its lines is `\\n`-terminated)")]
    Unterminated,
    /// The message did not serialize to a JSON object.
    #[error("message is not a JSON object: {0}")]
    NotObject(String),
    /// The writer was closed.
    #[error("the JSONL writer is closed")]
    Closed,
    /// The queue is full (only from [`JsonlWriter::try_write_line`]).
    #[error("the JSONL writer's queue is full")]
    Full,
    /// The publisher gave up; nothing more can be written.
    #[error("the JSONL writer stopped: {0}")]
    Terminal(String),
    /// Lines were accepted but could not be delivered (each is counted in [`WriterStats`]).
    #[error("{lines} lines were not delivered: {last_error}")]
    Lost {
        /// Lines lost.
        lines: u64,
        /// The last publishing error.
        last_error: String,
    },
    /// Closing the channel failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Counters of a [`JsonlWriter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Lines accepted by `write_line` / `write`.
    pub lines_accepted: u64,
    /// Lines written into a segment's body.
    pub lines_written: u64,
    /// Lines in segments the server acknowledged (closed with HTTP 200).
    pub lines_acked: u64,
    /// Lines that could not be delivered (their segment failed, or the publisher gave up).
    pub lines_lost: u64,
    /// Of the lines accepted, those the caller counts ([`JsonlWriter::write_chunk_counted`]):
    /// e.g. telemetry events, as opposed to loss reports, answers and log batches.
    pub counted_accepted: u64,
    /// Counted lines in segments the server acknowledged.
    pub counted_acked: u64,
    /// Counted lines that could not be delivered. Once the writer is closed every counted line
    /// is acked or lost: `counted_accepted = counted_acked + counted_lost`.
    pub counted_lost: u64,
    /// Bytes written into segments, newlines included.
    pub bytes_written: u64,
    /// HTTP chunks written (each carries every line queued since the previous one).
    pub chunks: u64,
    /// Segments opened.
    pub segments: u64,
    /// Segments that failed.
    pub segments_failed: u64,
    /// Rotations because the segment reached `max_segment_bytes`.
    pub rotations_by_size: u64,
    /// Rotations because `rotate_every` elapsed.
    pub rotations_by_time: u64,
}

#[derive(Default)]
struct WriterCounters {
    lines_accepted: AtomicU64,
    lines_written: AtomicU64,
    lines_acked: AtomicU64,
    lines_lost: AtomicU64,
    counted_accepted: AtomicU64,
    counted_acked: AtomicU64,
    counted_lost: AtomicU64,
    bytes_written: AtomicU64,
    chunks: AtomicU64,
    segments: AtomicU64,
    segments_failed: AtomicU64,
    rotations_by_size: AtomicU64,
    rotations_by_time: AtomicU64,
}

enum Cmd {
    Line(Bytes),
    /// Pre-joined `\n`-terminated lines, how many (and how many of the first are counted), and
    /// the queue room they hold.
    Chunk(Bytes, Lines, u32),
    Flush(oneshot::Sender<()>),
    Close,
}

struct WriterInner {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Room in the queue, in lines: the bound on what is queued (the channel itself is unbounded,
    /// so that a chunk of many lines counts as many). Closed when the writer task ends.
    room: Arc<Semaphore>,
    capacity: u32,
    closed: AtomicBool,
    terminal: Arc<Mutex<Option<String>>>,
    counters: Arc<WriterCounters>,
    task: Mutex<Option<JoinHandle<Result<(), JsonlError>>>>,
}

/// Writes JSON lines to a channel through one [`Publisher`]. Cheap to clone; all clones share one
/// writer task. Dropping every clone without [`close`](JsonlWriter::close) still flushes and closes.
#[derive(Clone)]
pub struct JsonlWriter {
    inner: Arc<WriterInner>,
}

impl JsonlWriter {
    /// Starts the writer task (needs a Tokio runtime) publishing through `publisher`.
    pub fn new(publisher: Publisher, opts: JsonlWriterOptions) -> JsonlWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity =
            u32::try_from(opts.queue_capacity.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let room = Arc::new(Semaphore::new(capacity as usize));
        let counters = Arc::new(WriterCounters::default());
        let terminal = Arc::new(Mutex::new(None));
        let task = WriterTask {
            publisher: Some(publisher),
            rx,
            room: room.clone(),
            opts,
            counters: counters.clone(),
            terminal: terminal.clone(),
            seg: None,
            closing: None,
            deadline: None,
            last_error: None,
        };
        let task_room = room.clone();
        let handle = tokio::spawn(async move {
            let result = task.run().await;
            // Nobody takes lines any more: writers waiting for room get an error, not a hang.
            task_room.close();
            result
        });
        JsonlWriter {
            inner: Arc::new(WriterInner {
                tx,
                room,
                capacity,
                closed: AtomicBool::new(false),
                terminal,
                counters,
                task: Mutex::new(Some(handle)),
            }),
        }
    }

    /// Queues one JSON object (no trailing newline; the writer adds it). Waits only while the
    /// queue is full. Errors once the writer is closed or its publisher gave up.
    pub async fn write_line(&self, line: Bytes) -> Result<(), JsonlError> {
        check_line(&line)?;
        self.check_open()?;
        self.enqueue(Cmd::Line(line), 1).await?;
        self.inner
            .counters
            .lines_accepted
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Like [`write_line`](JsonlWriter::write_line) but never waits: [`JsonlError::Full`] when the
    /// queue is full (the caller decides what to drop, and counts it).
    pub fn try_write_line(&self, line: Bytes) -> Result<(), JsonlError> {
        check_line(&line)?;
        self.check_open()?;
        match self.inner.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::NoPermits) => return Err(JsonlError::Full),
            Err(TryAcquireError::Closed) => return Err(self.stopped_error()),
        }
        self.send(Cmd::Line(line), 1)?;
        self.inner
            .counters
            .lines_accepted
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for room for `permits` lines, then queues `cmd`. Cancel-safe: nothing is taken
    /// until the room is granted, and the send after it does not wait.
    async fn enqueue(&self, cmd: Cmd, permits: u32) -> Result<(), JsonlError> {
        match self.inner.room.acquire_many(permits).await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(self.stopped_error()),
        }
        self.send(cmd, permits)
    }

    /// Queues `cmd`, which holds `permits` of room (given back if the task is gone).
    fn send(&self, cmd: Cmd, permits: u32) -> Result<(), JsonlError> {
        self.inner.tx.send(cmd).map_err(|_| {
            self.inner.room.add_permits(permits as usize);
            self.stopped_error()
        })
    }

    /// Queues several lines at once: `chunk` holds one or more JSON objects, each followed by `\n`
    /// (no empty line, nothing after the last `\n`). One queue slot and no per-line copy: this is
    /// the batch form of [`write_line`](JsonlWriter::write_line) for producers that already join
    /// their lines (the telemetry drain). The lines stay together in one segment unless the segment
    /// would overflow, in which case the chunk is split at line boundaries. Returns the number of
    /// lines queued. Waits only while the queue is full.
    pub async fn write_chunk(&self, chunk: Bytes) -> Result<u64, JsonlError> {
        self.write_chunk_counted(chunk, 0).await
    }

    /// [`write_chunk`](JsonlWriter::write_chunk) where the first `counted` lines (at most all
    /// of them) are lines the caller accounts for: [`WriterStats`]'s `counted_*` say how many
    /// were acknowledged and how many were lost, exactly. The telemetry drain counts its events
    /// this way (not the loss report it may append), so the runner knows which events arrived.
    pub async fn write_chunk_counted(&self, chunk: Bytes, counted: u64) -> Result<u64, JsonlError> {
        let lines = check_chunk(&chunk)?;
        let counted = counted.min(lines);
        self.check_open()?;
        // A chunk larger than the whole queue takes all of it (it still goes through, alone).
        let permits = u32::try_from(lines)
            .unwrap_or(u32::MAX)
            .min(self.inner.capacity);
        self.enqueue(
            Cmd::Chunk(chunk, Lines { lines, counted }, permits),
            permits,
        )
        .await?;
        let c = &self.inner.counters;
        c.lines_accepted.fetch_add(lines, Ordering::Relaxed);
        c.counted_accepted.fetch_add(counted, Ordering::Relaxed);
        Ok(lines)
    }

    /// Serializes `msg` compactly and queues it as one line.
    pub async fn write<T: Serialize + ?Sized>(&self, msg: &T) -> Result<(), JsonlError> {
        let line = serde_json::to_vec(msg).map_err(|e| JsonlError::NotObject(e.to_string()))?;
        if line.first() != Some(&b'{') {
            return Err(JsonlError::NotObject(
                String::from_utf8_lossy(&line).chars().take(80).collect(),
            ));
        }
        self.write_line(Bytes::from(line)).await
    }

    /// Waits until every line queued before this call is written into the open segment.
    pub async fn flush(&self) -> Result<(), JsonlError> {
        let (ack, done) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Flush(ack))
            .map_err(|_| self.stopped_error())?;
        done.await.map_err(|_| self.stopped_error())
    }

    /// Writes what is queued, ends the open segment, and closes the publisher (DELETE).
    /// Errors if the publisher gave up or lines were lost. Later calls return `Ok`.
    ///
    /// As with the reference publisher, a reader more than one segment behind when the channel
    /// is deleted misses the rest; readers that keep up (preconnected) receive everything.
    pub async fn close(&self) -> Result<(), JsonlError> {
        self.inner.closed.store(true, Ordering::SeqCst);
        let Some(task) = self.inner.task.lock().take() else {
            return Ok(());
        };
        // If the task already stopped, the send fails and its result tells why.
        let _ = self.inner.tx.send(Cmd::Close);
        match task.await {
            Ok(result) => result,
            Err(e) => Err(JsonlError::Terminal(format!("writer task failed: {e}"))),
        }
    }

    /// [`WriterStats::lines_lost`] alone (one atomic load), for callers that poll it.
    pub fn lines_lost(&self) -> u64 {
        self.inner.counters.lines_lost.load(Ordering::Relaxed)
    }

    /// Counters so far.
    pub fn stats(&self) -> WriterStats {
        let c = &self.inner.counters;
        WriterStats {
            lines_accepted: c.lines_accepted.load(Ordering::Relaxed),
            lines_written: c.lines_written.load(Ordering::Relaxed),
            lines_acked: c.lines_acked.load(Ordering::Relaxed),
            lines_lost: c.lines_lost.load(Ordering::Relaxed),
            counted_accepted: c.counted_accepted.load(Ordering::Relaxed),
            counted_acked: c.counted_acked.load(Ordering::Relaxed),
            counted_lost: c.counted_lost.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            chunks: c.chunks.load(Ordering::Relaxed),
            segments: c.segments.load(Ordering::Relaxed),
            segments_failed: c.segments_failed.load(Ordering::Relaxed),
            rotations_by_size: c.rotations_by_size.load(Ordering::Relaxed),
            rotations_by_time: c.rotations_by_time.load(Ordering::Relaxed),
        }
    }

    fn check_open(&self) -> Result<(), JsonlError> {
        if let Some(t) = self.inner.terminal.lock().as_ref() {
            return Err(JsonlError::Terminal(t.clone()));
        }
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(JsonlError::Closed);
        }
        Ok(())
    }

    fn stopped_error(&self) -> JsonlError {
        match self.inner.terminal.lock().as_ref() {
            Some(t) => JsonlError::Terminal(t.clone()),
            None => JsonlError::Closed,
        }
    }
}

fn check_line(line: &[u8]) -> Result<(), JsonlError> {
    if line.is_empty() {
        return Err(JsonlError::Empty);
    }
    if memchr::memchr(b'\n', line).is_some() {
        return Err(JsonlError::Newline);
    }
    Ok(())
}

/// Checks a pre-joined chunk (see [`JsonlWriter::write_chunk`]); returns its line count.
fn check_chunk(chunk: &[u8]) -> Result<u64, JsonlError> {
    if chunk.is_empty() {
        return Err(JsonlError::Empty);
    }
    if chunk.last() != Some(&b'\n') {
        return Err(JsonlError::Unterminated);
    }
    let mut lines = 0u64;
    let mut start = 0usize;
    for nl in memchr::memchr_iter(b'\n', chunk) {
        if nl == start {
            return Err(JsonlError::Empty);
        }
        start = nl + 1;
        lines += 1;
    }
    Ok(lines)
}

/// A number of lines, and how many of them are counted lines (see [`WriterStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lines {
    lines: u64,
    counted: u64,
}

impl std::ops::AddAssign for Lines {
    fn add_assign(&mut self, other: Lines) {
        self.lines += other.lines;
        self.counted += other.counted;
    }
}

impl Lines {
    const ONE: Lines = Lines {
        lines: 1,
        counted: 0,
    };
    const ONE_COUNTED: Lines = Lines {
        lines: 1,
        counted: 1,
    };
}

struct OpenSegment {
    writer: SegmentWriter,
    lines: Lines,
    bytes: usize,
}

/// Lines gathered for one write: either one pre-joined chunk kept whole, or a built buffer.
#[derive(Default)]
struct Batch {
    /// A chunk from [`JsonlWriter::write_chunk`] taken as is (no copy) while nothing else is queued.
    whole: Option<(Bytes, Lines)>,
    buf: BytesMut,
    lines: Lines,
}

impl Batch {
    fn len(&self) -> usize {
        self.whole.as_ref().map_or(0, |(c, _)| c.len()) + self.buf.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves a whole chunk into the buffer, before more lines are appended after it.
    fn spill(&mut self) {
        if let Some((chunk, n)) = self.whole.take() {
            if self.buf.capacity() == 0 {
                self.buf.reserve((chunk.len() * 2).max(4096));
            }
            self.buf.extend_from_slice(&chunk);
            self.lines += n;
        }
    }
}

type Closing = JoinHandle<(Result<(), PublishError>, Lines)>;

struct WriterTask {
    publisher: Option<Publisher>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    room: Arc<Semaphore>,
    opts: JsonlWriterOptions,
    counters: Arc<WriterCounters>,
    terminal: Arc<Mutex<Option<String>>>,
    seg: Option<OpenSegment>,
    /// The previous segment's close, running in the background until the next segment opens.
    closing: Option<Closing>,
    /// When the open segment rotates by time.
    deadline: Option<Instant>,
    last_error: Option<String>,
}

impl WriterTask {
    async fn run(mut self) -> Result<(), JsonlError> {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        let mut stash: Option<Cmd> = None;
        loop {
            if armed != self.deadline {
                armed = self.deadline;
                sleep.as_mut().reset(armed.unwrap_or_else(far));
            }
            let cmd = match stash.take() {
                Some(cmd) => cmd,
                None => tokio::select! {
                    biased;
                    cmd = self.rx.recv() => self.taken(cmd.unwrap_or(Cmd::Close)),
                    _ = &mut sleep, if armed.is_some() => {
                        self.counters.rotations_by_time.fetch_add(1, Ordering::Relaxed);
                        self.rotate().await;
                        continue;
                    }
                },
            };
            match cmd {
                Cmd::Line(_) | Cmd::Chunk(..) => {
                    let mut batch = Batch::default();
                    self.add(&mut batch, cmd).await;
                    // Coalesce everything queued since the last write into one chunk.
                    while batch.len() < MAX_BATCH_BYTES {
                        match self.rx.try_recv().map(|c| self.taken(c)) {
                            Ok(cmd @ (Cmd::Line(_) | Cmd::Chunk(..))) => {
                                self.add(&mut batch, cmd).await
                            }
                            Ok(other) => {
                                stash = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.write_pending(&mut batch).await;
                }
                Cmd::Flush(ack) => {
                    let _ = ack.send(());
                }
                Cmd::Close => return self.finish().await,
            }
        }
    }

    /// Gives back the queue room a command held, as it leaves the queue.
    fn taken(&self, cmd: Cmd) -> Cmd {
        match &cmd {
            Cmd::Line(_) => self.room.add_permits(1),
            Cmd::Chunk(_, _, permits) => self.room.add_permits(*permits as usize),
            Cmd::Flush(_) | Cmd::Close => {}
        }
        cmd
    }

    /// Adds a queued line or chunk to `batch`. A chunk that fits the open segment is kept as it
    /// is when it comes first (written without a copy); otherwise it is added line by line.
    async fn add(&mut self, batch: &mut Batch, cmd: Cmd) {
        match cmd {
            Cmd::Line(line) => {
                batch.spill();
                if batch.buf.capacity() == 0 {
                    batch.buf.reserve((line.len() + 1).max(4096));
                }
                self.add_line(&mut batch.buf, &mut batch.lines, &line, Lines::ONE)
                    .await;
            }
            Cmd::Chunk(chunk, n, _) => {
                let in_segment = self.seg.as_ref().map_or(0, |s| s.bytes) + batch.len();
                if in_segment + chunk.len() <= self.opts.max_segment_bytes {
                    if batch.is_empty() {
                        batch.whole = Some((chunk, n));
                    } else {
                        batch.spill();
                        batch.buf.extend_from_slice(&chunk);
                        batch.lines += n;
                    }
                    return;
                }
                batch.spill();
                // Rare (once per segment): split at line boundaries so the segment cap holds.
                let mut start = 0;
                for (i, nl) in memchr::memchr_iter(b'\n', &chunk).enumerate() {
                    let line = chunk.slice(start..nl);
                    start = nl + 1;
                    let one = if (i as u64) < n.counted {
                        Lines::ONE_COUNTED
                    } else {
                        Lines::ONE
                    };
                    self.add_line(&mut batch.buf, &mut batch.lines, &line, one)
                        .await;
                }
            }
            Cmd::Flush(_) | Cmd::Close => {}
        }
    }

    /// Writes what `batch` holds.
    async fn write_pending(&mut self, batch: &mut Batch) {
        match batch.whole.take() {
            Some((chunk, n)) => self.write_data(chunk, n).await,
            None => {
                let lines = std::mem::take(&mut batch.lines);
                self.write_batch(&mut batch.buf, lines).await
            }
        }
    }

    /// Appends one line, first writing the batch and rotating if the segment would overflow.
    async fn add_line(&mut self, batch: &mut BytesMut, lines: &mut Lines, line: &[u8], one: Lines) {
        let in_segment = self.seg.as_ref().map_or(0, |s| s.bytes) + batch.len();
        if in_segment > 0 && in_segment + line.len() + 1 > self.opts.max_segment_bytes {
            self.write_batch(batch, *lines).await;
            *lines = Lines::default();
            if self.seg.is_some() {
                self.counters
                    .rotations_by_size
                    .fetch_add(1, Ordering::Relaxed);
                self.rotate().await;
            }
        }
        batch.extend_from_slice(line);
        batch.extend_from_slice(b"\n");
        *lines += one;
    }

    /// Writes the batch into the open segment (opening one if needed). A failed segment is
    /// abandoned (its lines counted lost) and the batch goes into the next one, until the
    /// publisher gives up.
    async fn write_batch(&mut self, batch: &mut BytesMut, lines: Lines) {
        if batch.is_empty() {
            return;
        }
        let data = batch.split().freeze();
        self.write_data(data, lines).await
    }

    /// [`write_batch`](Self::write_batch) of bytes already framed (`lines` lines, each `\n`-ended).
    async fn write_data(&mut self, data: Bytes, lines: Lines) {
        loop {
            if self.terminal.lock().is_some() {
                self.lost(lines);
                return;
            }
            if self.seg.is_none() {
                // Segments reach the server in order: segment n must be acknowledged before the
                // first byte of n+1 (as the reference publisher does), else a reader asking for n
                // could find n+1 already at the live edge and jump past n.
                self.settle_closing().await;
                if self.terminal.lock().is_some() {
                    continue;
                }
                let Some(publisher) = self.publisher.as_mut() else {
                    self.lost(lines);
                    return;
                };
                match publisher.next_segment().await {
                    Ok(writer) => {
                        self.counters.segments.fetch_add(1, Ordering::Relaxed);
                        self.deadline = Some(Instant::now() + self.opts.rotate_every);
                        self.seg = Some(OpenSegment {
                            writer,
                            lines: Lines::default(),
                            bytes: 0,
                        });
                    }
                    Err(e) => {
                        self.publish_failed(&e);
                        continue;
                    }
                }
            }
            if self
                .seg
                .as_ref()
                .is_some_and(|s| s.bytes > 0 && s.writer.post_ended())
            {
                // Its POST died (e.g. the server restarted): the close retries what it holds,
                // and new lines go to the next segment, where readers that saw part of it look.
                self.rotate().await;
                continue;
            }
            let Some(seg) = self.seg.as_mut() else {
                continue;
            };
            match seg.writer.write(data.clone()).await {
                Ok(()) => {
                    seg.lines += lines;
                    seg.bytes += data.len();
                    let c = &self.counters;
                    c.lines_written.fetch_add(lines.lines, Ordering::Relaxed);
                    c.bytes_written
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    c.chunks.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    let failed_lines = seg.lines;
                    self.seg = None;
                    self.deadline = None;
                    self.counters
                        .segments_failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.lost(failed_lines);
                    self.publish_failed(&e);
                }
            }
        }
    }

    /// Ends the open segment in the background, after settling the previous one.
    async fn rotate(&mut self) {
        self.deadline = None;
        let Some(seg) = self.seg.take() else {
            return;
        };
        self.settle_closing().await;
        self.closing = Some(tokio::spawn(async move {
            let lines = seg.lines;
            (seg.writer.close().await, lines)
        }));
    }

    async fn settle_closing(&mut self) {
        let Some(closing) = self.closing.take() else {
            return;
        };
        match closing.await {
            Ok((Ok(()), lines)) => {
                let c = &self.counters;
                c.lines_acked.fetch_add(lines.lines, Ordering::Relaxed);
                c.counted_acked.fetch_add(lines.counted, Ordering::Relaxed);
            }
            Ok((Err(e), lines)) => {
                self.counters
                    .segments_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.lost(lines);
                self.publish_failed(&e);
            }
            Err(e) => {
                self.last_error = Some(format!("segment close task failed: {e}"));
            }
        }
    }

    fn lost(&mut self, lines: Lines) {
        if lines.lines > 0 {
            let c = &self.counters;
            c.lines_lost.fetch_add(lines.lines, Ordering::Relaxed);
            c.counted_lost.fetch_add(lines.counted, Ordering::Relaxed);
        }
    }

    fn publish_failed(&mut self, e: &PublishError) {
        tracing::error!(error = %e, "JSONL segment failed; its lines are counted as lost");
        self.last_error = Some(e.to_string());
        if matches!(e, PublishError::Terminal { .. } | PublishError::Closed) {
            *self.terminal.lock() = Some(e.to_string());
        }
    }

    async fn finish(mut self) -> Result<(), JsonlError> {
        self.rx.close();
        // Lines still queued (sent before close was observed) are written too.
        while let Ok(cmd) = self.rx.try_recv() {
            let cmd = self.taken(cmd);
            if let Cmd::Line(_) | Cmd::Chunk(..) = cmd {
                let mut batch = Batch::default();
                self.add(&mut batch, cmd).await;
                self.write_pending(&mut batch).await;
            }
        }
        self.rotate().await;
        self.settle_closing().await;
        let closed = match self.publisher.take() {
            Some(p) => p.close().await,
            None => Ok(()),
        };
        if let Some(t) = self.terminal.lock().clone() {
            return Err(JsonlError::Terminal(t));
        }
        let lost = self.counters.lines_lost.load(Ordering::Relaxed);
        if lost > 0 {
            return Err(JsonlError::Lost {
                lines: lost,
                last_error: self.last_error.unwrap_or_default(),
            });
        }
        closed.map_err(JsonlError::from)
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// Options of a [`JsonlReader`].
#[derive(Debug, Clone)]
pub struct JsonlReaderOptions {
    /// Largest line accepted (without its `\n`); longer lines are skipped and counted.
    pub max_line_bytes: usize,
}

impl Default for JsonlReaderOptions {
    fn default() -> Self {
        JsonlReaderOptions {
            max_line_bytes: 5 << 20,
        }
    }
}

/// Counters of a [`JsonlReader`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Lines delivered.
    pub lines: u64,
    /// Of those, lines that ended their segment without a `\n`.
    pub unterminated: u64,
    /// Bad lines: not UTF-8.
    pub not_utf8: u64,
    /// Bad lines: not valid JSON.
    pub not_json: u64,
    /// Bad lines: valid UTF-8 but not a JSON object.
    pub not_object: u64,
    /// Bad lines: a JSON object that does not match the requested type.
    pub mismatch: u64,
    /// Bad lines: longer than `max_line_bytes`.
    pub oversize: u64,
    /// Bad lines: a segment ended (or broke off) in the middle of the line.
    pub partial: u64,
    /// Segments whose body broke off or exceeded the subscriber's segment cap.
    pub segment_errors: u64,
    /// The subscriber's counters.
    pub subscriber: SubscriberStats,
}

/// A one-line summary: lines, segments, bytes, the bad lines by kind, broken segments and the
/// subscriber's notes.
impl std::fmt::Display for ReaderStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sub = &self.subscriber;
        write!(
            f,
            "{} lines from {} segments ({} bytes)",
            self.lines, sub.segments, sub.bytes
        )?;
        if self.bad_lines() > 0 {
            let kinds = [
                ("not UTF-8", self.not_utf8),
                ("not JSON", self.not_json),
                ("not an object", self.not_object),
                ("over the line limit", self.oversize),
                ("cut off at a segment end", self.partial),
            ];
            let detail: Vec<String> = kinds
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(what, n)| format!("{n} {what}"))
                .collect();
            write!(
                f,
                "; {} bad lines skipped ({})",
                self.bad_lines(),
                detail.join(", ")
            )?;
        }
        if self.segment_errors > 0 {
            write!(f, "; {} segments broke off", self.segment_errors)?;
        }
        write!(f, "{}", sub.notes())
    }
}

impl ReaderStats {
    /// All bad lines, every kind together.
    pub fn bad_lines(&self) -> u64 {
        self.not_utf8
            + self.not_json
            + self.not_object
            + self.mismatch
            + self.oversize
            + self.partial
    }
}

/// Reads JSON lines from a channel through one [`Subscriber`].
pub struct JsonlReader {
    sub: Subscriber,
    seg: Option<SegmentReader>,
    splitter: LineSplitter,
    max: usize,
    stats: ReaderStats,
    last_warn: Option<std::time::Instant>,
    suppressed: u64,
}

impl JsonlReader {
    /// A reader of `subscriber`'s channel.
    pub fn new(subscriber: Subscriber, opts: JsonlReaderOptions) -> JsonlReader {
        JsonlReader {
            sub: subscriber,
            seg: None,
            splitter: LineSplitter::new(opts.max_line_bytes),
            max: opts.max_line_bytes,
            stats: ReaderStats::default(),
            last_warn: None,
            suppressed: 0,
        }
    }

    /// The next good line decoded as `T`, or `None` when the channel ends. Bad lines are counted
    /// and skipped; an error means the subscriber gave up (see [`Subscriber::next_segment`]).
    /// Cancel-safe: state changes only after each await completes, so it can be used in `select!`.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, SubscribeError> {
        self.next_with(Self::take::<T>).await
    }

    /// The next line as raw bytes (without its `\n` and without a trailing `\r`), or `None` when
    /// the channel ends; the caller validates it, so each line is parsed once. Blank lines are
    /// skipped; oversize lines are counted ([`ReaderStats::oversize`]) and skipped, as by
    /// [`next`](JsonlReader::next). Content is NOT checked here (UTF-8, JSON, object): a caller
    /// that rejects a line counts it itself. A segment's unterminated tail is delivered only when
    /// it is a complete JSON object (counted in `unterminated`), else counted as `partial`.
    /// Cancel-safe, like [`next`](JsonlReader::next).
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, SubscribeError> {
        self.next_with(Self::take_raw).await
    }

    /// The read loop of [`next`](JsonlReader::next) and [`next_line`](JsonlReader::next_line):
    /// `take` turns each split event into an item or counts and skips it.
    async fn next_with<T>(
        &mut self,
        take: fn(&mut Self, SplitEvent) -> Option<T>,
    ) -> Result<Option<T>, SubscribeError> {
        loop {
            while let Some(event) = self.splitter.next_event() {
                if let Some(msg) = take(self, event) {
                    return Ok(Some(msg));
                }
            }
            if let Some(seg) = self.seg.as_mut() {
                match seg.chunk().await {
                    Ok(Some(chunk)) => self.splitter.push(chunk),
                    Ok(None) => {
                        self.seg = None;
                        if let Some(msg) = self.splitter.finish().and_then(|t| take(self, t)) {
                            return Ok(Some(msg));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "JSONL segment error; continuing with the next segment");
                        self.stats.segment_errors += 1;
                        self.seg = None;
                        if let Some(msg) = self.splitter.finish().and_then(|t| take(self, t)) {
                            return Ok(Some(msg));
                        }
                    }
                }
                continue;
            }
            match self.sub.next_segment().await? {
                Some(seg) => self.seg = Some(seg),
                None => return Ok(None),
            }
        }
    }

    /// [`Subscriber::channel_missing`]: the channel was never there (an error, not an end).
    pub fn channel_missing(&self) -> bool {
        self.sub.channel_missing()
    }

    /// Counters so far.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            subscriber: self.sub.stats(),
            ..self.stats
        }
    }

    fn take<T: DeserializeOwned>(&mut self, event: SplitEvent) -> Option<T> {
        match event {
            SplitEvent::Line(line) => match decode_line::<T>(&line, self.max) {
                Ok(msg) => {
                    self.stats.lines += 1;
                    Some(msg)
                }
                Err(e) => {
                    self.bad(&e);
                    None
                }
            },
            SplitEvent::Oversize { len } => {
                self.bad(&LineError::Oversize { len, max: self.max });
                None
            }
            SplitEvent::Unterminated(tail) => match decode_line::<T>(&tail, self.max) {
                Ok(msg) => {
                    self.stats.lines += 1;
                    self.stats.unterminated += 1;
                    Some(msg)
                }
                Err(_) => {
                    self.partial(tail.len());
                    None
                }
            },
        }
    }

    /// Counts and logs a segment that ended inside a `len`-byte line.
    fn partial(&mut self, len: usize) {
        self.stats.partial += 1;
        self.warn(&format!("segment ended in the middle of a {len}-byte line"));
    }

    fn take_raw(&mut self, event: SplitEvent) -> Option<Bytes> {
        match event {
            SplitEvent::Line(line) => {
                self.stats.lines += 1;
                Some(strip_cr(line))
            }
            SplitEvent::Oversize { len } => {
                self.bad(&LineError::Oversize { len, max: self.max });
                None
            }
            SplitEvent::Unterminated(tail) => {
                // Rare (once per broken segment): only a complete object is worth delivering.
                match decode_line::<serde::de::IgnoredAny>(&tail, self.max) {
                    Ok(_) => {
                        self.stats.lines += 1;
                        self.stats.unterminated += 1;
                        Some(strip_cr(tail))
                    }
                    Err(_) => {
                        self.partial(tail.len());
                        None
                    }
                }
            }
        }
    }

    fn bad(&mut self, e: &LineError) {
        let s = &mut self.stats;
        match e {
            LineError::Oversize { .. } => s.oversize += 1,
            LineError::NotUtf8 => s.not_utf8 += 1,
            LineError::NotObject => s.not_object += 1,
            LineError::NotJson(_) => s.not_json += 1,
            LineError::Mismatch(_) => s.mismatch += 1,
        }
        self.warn(&e.to_string());
    }

    /// At most one warning per second, saying how many were suppressed in between.
    fn warn(&mut self, what: &str) {
        let now = std::time::Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        self.last_warn = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(url = %self.sub.url(), suppressed, "skipped a bad JSONL line: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn split_all(s: &mut LineSplitter, chunks: &[&[u8]]) -> Vec<SplitEvent> {
        let mut out = Vec::new();
        for c in chunks {
            s.push(Bytes::copy_from_slice(c));
            while let Some(e) = s.next_event() {
                out.push(e);
            }
        }
        out.extend(s.finish());
        out
    }

    fn line(s: &str) -> SplitEvent {
        SplitEvent::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn splitter_joins_lines_across_chunks() {
        let mut s = LineSplitter::new(100);
        let ev = split_all(&mut s, &[b"{\"a\"", b":1}\n{\"b\":2}\n{", b"\"c\":3}\n"]);
        assert_eq!(
            ev,
            vec![line("{\"a\":1}"), line("{\"b\":2}"), line("{\"c\":3}")]
        );
    }

    #[test]
    fn splitter_skips_oversize_lines_without_buffering_them() {
        let mut s = LineSplitter::new(8);
        let big = [b'x'; 30];
        let ev = split_all(
            &mut s,
            &[b"{\"a\":1}\n", &big[..10], &big[10..], b"\n{\"b\":2}\n"],
        );
        assert_eq!(
            ev,
            vec![
                line("{\"a\":1}"),
                SplitEvent::Oversize { len: 30 },
                line("{\"b\":2}")
            ]
        );
        assert!(
            s.partial.capacity() <= 8,
            "kept {} bytes",
            s.partial.capacity()
        );
        // Exactly at the limit is fine; one over is not.
        let mut s = LineSplitter::new(7);
        let ev = split_all(&mut s, &[b"{\"a\":1}\n{\"a\":12}\n"]);
        assert_eq!(ev, vec![line("{\"a\":1}"), SplitEvent::Oversize { len: 8 }]);
    }

    #[test]
    fn splitter_reports_the_unterminated_tail_and_skips_blank_lines() {
        let mut s = LineSplitter::new(100);
        let ev = split_all(&mut s, &[b"\n\r\n{\"a\":1}\n  \n{\"b\""]);
        assert_eq!(
            ev,
            vec![
                line("{\"a\":1}"),
                SplitEvent::Unterminated(Bytes::from_static(b"{\"b\""))
            ]
        );
        // The splitter is reusable for the next segment.
        let ev = split_all(&mut s, &[b"{\"c\":1}\n"]);
        assert_eq!(ev, vec![line("{\"c\":1}")]);
    }

    #[test]
    fn splitter_reports_oversize_tail() {
        let mut s = LineSplitter::new(4);
        assert_eq!(
            split_all(&mut s, &[b"{\"a\":1"]),
            vec![SplitEvent::Oversize { len: 6 }]
        );
    }

    #[test]
    fn decode_line_classifies_every_kind_of_bad_line() {
        let max = 64;
        assert!(decode_line::<Value>(b"{\"a\":1}", max).is_ok());
        assert!(decode_line::<Value>(b"  {\"a\":1}\r", max).is_ok());
        assert_eq!(decode_line::<Value>(b"[1]", max), Err(LineError::NotObject));
        assert_eq!(
            decode_line::<Value>(b"\"x\"", max),
            Err(LineError::NotObject)
        );
        assert_eq!(decode_line::<Value>(b"", max), Err(LineError::NotObject));
        assert_eq!(
            decode_line::<Value>(b"{\"a\":\xff}", max),
            Err(LineError::NotUtf8)
        );
        assert!(matches!(
            decode_line::<Value>(b"{garbage", max),
            Err(LineError::NotJson(_))
        ));
        assert!(matches!(
            decode_line::<Value>(b"{\"a\":1} x", max),
            Err(LineError::NotJson(_))
        ));
        assert!(matches!(
            decode_line::<Value>(&[b' '; 65], max),
            Err(LineError::Oversize { len: 65, max: 64 })
        ));
        assert!(matches!(
            decode_line::<crate::messages::EventMessage>(b"{\"type\":\"telemetry\"}", max),
            Err(LineError::Mismatch(_))
        ));
    }

    #[test]
    fn writer_rejects_lines_that_would_break_framing() {
        assert!(matches!(
            check_line(b"{\"a\":\n1}"),
            Err(JsonlError::Newline)
        ));
        assert!(matches!(check_line(b""), Err(JsonlError::Empty)));
        assert!(check_line(b"{}").is_ok());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// However the stream is cut into chunks, the splitter finds the same lines.
            #[test]
            fn chunking_does_not_change_the_lines(
                lines in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..40), 0..20),
                cuts in proptest::collection::vec(0usize..1000, 0..10),
                max in 1usize..48,
            ) {
                let mut stream = Vec::new();
                for l in &lines {
                    stream.extend_from_slice(l);
                    stream.push(b'\n');
                }
                let mut whole = LineSplitter::new(max);
                let expected = split_all(&mut whole, &[&stream]);
                let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
                points.sort_unstable();
                let mut chunks: Vec<&[u8]> = Vec::new();
                let mut prev = 0;
                for p in points {
                    chunks.push(&stream[prev..p]);
                    prev = p;
                }
                chunks.push(&stream[prev..]);
                let mut cut = LineSplitter::new(max);
                prop_assert_eq!(split_all(&mut cut, &chunks), expected.clone());
                // And the lines are exactly the non-blank input lines within the limit.
                let want: Vec<SplitEvent> = lines
                    .iter()
                    .filter(|l| l.len() > max || !is_blank(l))
                    .map(|l| if l.len() > max { SplitEvent::Oversize { len: l.len() } } else { SplitEvent::Line(Bytes::copy_from_slice(l)) })
                    .collect();
                prop_assert_eq!(expected, want);
            }

            /// Arbitrary bytes never panic the decoder.
            #[test]
            fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = decode_line::<crate::messages::EventMessage>(&bytes, 100);
                let _ = decode_line::<crate::messages::ControlMessage>(&bytes, 100);
            }
        }
    }
}
