//! [`LineOutput`]: where a drain task writes its JSONL lines.
//!
//! The runner's real output is the session's events writer ([`trickle::jsonl::JsonlWriter`]); the
//! others here serve tests, benchmarks and operators: [`LineCollector`] keeps lines in memory,
//! [`Discard`] counts and forgets them, [`WriterOutput`] writes them to any `AsyncWrite`.

use bytes::Bytes;
use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use trickle::jsonl::JsonlWriter;

/// A failed [`LineOutput::write_lines`]: the first `written` lines were written, the rest were not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("events output failed after {written} line(s): {reason}")]
pub struct OutputError {
    /// Lines written before the failure.
    pub written: usize,
    /// What failed.
    pub reason: String,
}

/// A destination for JSONL lines, written in order.
pub trait LineOutput: Send + 'static {
    /// Writes `lines` (each one JSON object without a trailing newline) in order, as one batch.
    fn write_lines(
        &mut self,
        lines: Vec<Bytes>,
    ) -> impl Future<Output = Result<(), OutputError>> + Send;

    /// Writes lines given pre-joined: `joined` holds each line followed by `\n`, and `ends[i]` is
    /// the index of line `i`'s `\n`. The default slices it into [`LineOutput::write_lines`] (no
    /// copy); an output that takes framed bytes (the events writer) writes it in one piece.
    fn write_joined(
        &mut self,
        joined: Bytes,
        ends: &[usize],
    ) -> impl Future<Output = Result<(), OutputError>> + Send {
        let mut start = 0;
        let lines: Vec<Bytes> = ends
            .iter()
            .map(|&end| {
                let line = joined.slice(start..end.min(joined.len()).max(start));
                start = end + 1;
                line
            })
            .collect();
        self.write_lines(lines)
    }

    /// [`LineOutput::write_joined`] where the first `counted` lines are the caller's events and
    /// the rest its own lines (a loss report): an output that learns later whether lines arrived
    /// (the events writer) accounts for the events apart. The default ignores the distinction.
    fn write_joined_counted(
        &mut self,
        joined: Bytes,
        ends: &[usize],
        counted: usize,
    ) -> impl Future<Output = Result<(), OutputError>> + Send {
        let _ = counted;
        self.write_joined(joined, ends)
    }

    /// Events this output accepted but failed to deliver later (a running total). A drain task
    /// moves what is new from its `delivered` to its drops at each wake-up, so they are reported
    /// as `telemetry_dropped` too. Default: 0 (an output that fails, if at all, when writing).
    /// The events writer leaves it at 0: its owner folds the writer's `counted_lost` (the
    /// runner's `fold_lost_lines`), which counts only the events among its lost lines.
    fn lines_lost(&self) -> u64 {
        0
    }
}

/// The session's events writer: each line is queued on the writer, which coalesces everything
/// queued into one HTTP chunk. "Written" here means accepted by the writer; lines the writer later
/// fails to deliver are counted in its own [`trickle::jsonl::WriterStats::lines_lost`] (events:
/// `counted_lost`).
impl LineOutput for JsonlWriter {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        for (written, line) in lines.into_iter().enumerate() {
            if let Err(e) = self.write_line(line).await {
                return Err(OutputError {
                    written,
                    reason: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// One queue send and no per-line copy for the whole batch ([`JsonlWriter::write_chunk`]).
    async fn write_joined(&mut self, joined: Bytes, ends: &[usize]) -> Result<(), OutputError> {
        self.write_joined_counted(joined, ends, 0).await
    }

    /// The events are counted lines ([`JsonlWriter::write_chunk_counted`]): the writer's
    /// `counted_acked` / `counted_lost` then say exactly which events arrived.
    async fn write_joined_counted(
        &mut self,
        joined: Bytes,
        _ends: &[usize],
        counted: usize,
    ) -> Result<(), OutputError> {
        self.write_chunk_counted(joined, counted as u64)
            .await
            .map(|_| ())
            .map_err(|e| OutputError {
                written: 0,
                reason: e.to_string(),
            })
    }
}

/// Keeps every line in memory (shared: clone it to read what was written).
#[derive(Debug, Clone, Default)]
pub struct LineCollector {
    lines: Arc<Mutex<Vec<Bytes>>>,
}

impl LineCollector {
    /// An empty collector.
    pub fn new() -> Self {
        LineCollector::default()
    }

    /// A copy of the lines written so far.
    pub fn lines(&self) -> Vec<Bytes> {
        self.lines.lock().clone()
    }

    /// Lines written so far.
    pub fn len(&self) -> usize {
        self.lines.lock().len()
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.lines.lock().is_empty()
    }
}

impl LineOutput for LineCollector {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        self.lines.lock().extend(lines);
        Ok(())
    }
}

/// Counts lines and bytes and forgets them (benchmarks).
#[derive(Debug, Clone, Default)]
pub struct Discard {
    lines: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Discard {
    /// A fresh counter.
    pub fn new() -> Self {
        Discard::default()
    }

    /// Lines seen.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Bytes seen (newlines excluded).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl LineOutput for Discard {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        let bytes: usize = lines.iter().map(Bytes::len).sum();
        self.lines.fetch_add(lines.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes each line plus `\n` to an `AsyncWrite` (a file, stdout, a socket), one write per batch.
#[derive(Debug)]
pub struct WriterOutput<W> {
    writer: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> WriterOutput<W> {
    /// Wraps `writer`.
    pub fn new(writer: W) -> Self {
        WriterOutput {
            writer,
            buf: Vec::new(),
        }
    }

    /// The inner writer back.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> LineOutput for WriterOutput<W> {
    async fn write_lines(&mut self, lines: Vec<Bytes>) -> Result<(), OutputError> {
        self.buf.clear();
        for l in &lines {
            self.buf.extend_from_slice(l);
            self.buf.push(b'\n');
        }
        let res = async {
            self.writer.write_all(&self.buf).await?;
            self.writer.flush().await
        }
        .await;
        // A failed write may have written part of the batch; count none of it as delivered.
        res.map_err(|e| OutputError {
            written: 0,
            reason: e.to_string(),
        })
    }
}
