//! [`JsonlOutput`]: accepted events appended to a JSON-lines file, fsynced before the answer.
//!
//! One writer thread does all the I/O. It takes every request waiting at once, writes them with
//! one `write` and one `fdatasync` (group commit), then answers them all; so concurrent requests
//! share an fsync instead of queueing for one each. A failed write is cut back off the file, so
//! the file only ever holds whole lines; a line cut short by a crash (never answered 200) is
//! removed when the file is opened again. Newlines inside an event (only possible as JSON
//! whitespace) are written as spaces, so each event stays on one line.

use super::{Output, OutputError};
use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// How much of the file's end [`Output::recent_ids`] reads.
const TAIL_BYTES: u64 = 64 << 20;
/// The most requests one group commit takes.
const MAX_GROUP: usize = 4096;

struct Req {
    lines: Vec<Bytes>,
    done: oneshot::Sender<Result<(), String>>,
}

/// An append-only JSON-lines file.
pub struct JsonlOutput {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Req>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for JsonlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlOutput")
            .field("path", &self.path)
            .finish()
    }
}

impl JsonlOutput {
    /// Opens (creating) `path` for appending, cutting a torn last line, and starts the writer.
    pub fn open(path: &Path) -> io::Result<JsonlOutput> {
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot {what} the output file {}: {e}; pass --output jsonl:PATH with a writable path", path.display()),
            )
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| ctx("create the directory of", e))?;
        }
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| ctx("open", e))?;
        cut_torn_line(&mut file).map_err(|e| ctx("repair", e))?;
        if !existed {
            // Make the new file's directory entry durable too.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                if let Ok(d) = File::open(parent) {
                    let _ = d.sync_all();
                }
            }
        }
        let (tx, rx) = mpsc::channel::<Req>();
        let thread = std::thread::Builder::new()
            .name("collector-jsonl".into())
            .spawn(move || writer(file, rx))
            .map_err(|e| ctx("start the writer for", e))?;
        Ok(JsonlOutput {
            path: path.to_owned(),
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, reason: impl Into<String>) -> OutputError {
        OutputError {
            output: "jsonl",
            reason: reason.into(),
        }
    }
}

impl Drop for JsonlOutput {
    fn drop(&mut self) {
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// Truncates a last line without its newline (a write cut short by a crash; never answered 200).
fn cut_torn_line(file: &mut File) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    tracing::warn!(target: "collector", cut = len - keep, "output file ended in a torn line (a crash mid-write, never acknowledged); cut it");
    file.set_len(keep)?;
    file.sync_all()
}

fn writer(mut file: File, rx: mpsc::Receiver<Req>) {
    let mut len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::with_capacity(1 << 20);
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        while reqs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        buf.clear();
        for r in &reqs {
            for line in &r.lines {
                let start = buf.len();
                buf.extend_from_slice(line);
                for b in &mut buf[start..] {
                    if *b == b'\n' || *b == b'\r' {
                        *b = b' ';
                    }
                }
                buf.push(b'\n');
            }
        }
        let res = file.write_all(&buf).and_then(|()| file.sync_data());
        let answer = match res {
            Ok(()) => {
                len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Leave only whole, acknowledged lines in the file.
                if let Err(te) = file.set_len(len) {
                    tracing::error!(target: "collector", error = %te, "cannot cut a failed write off the output file");
                }
                Err(e.to_string())
            }
        };
        for r in reqs {
            let _ = r.done.send(answer.clone());
        }
    }
}

impl Output for JsonlOutput {
    fn name(&self) -> &'static str {
        "jsonl"
    }

    fn append(&self, events: Vec<Bytes>) -> BoxFuture<'_, Result<(), OutputError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            let (done, wait) = oneshot::channel();
            let sent = match &*self.tx.lock() {
                Some(tx) => tx
                    .send(Req {
                        lines: events,
                        done,
                    })
                    .is_ok(),
                None => false,
            };
            if !sent {
                return Err(self.err("the writer has stopped"));
            }
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(self.err(format!("write to {}: {e}", self.path.display()))),
                Err(_) => Err(self.err("the writer stopped before answering")),
            }
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), OutputError>> {
        Box::pin(async move {
            if self.tx.lock().is_none() {
                return Err(self.err("the writer has stopped"));
            }
            OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map(drop)
                .map_err(|e| self.err(format!("{} is not writable: {e}", self.path.display())))
        })
    }

    fn recent_ids(&self, limit: usize) -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct IdOnly {
            id: String,
        }
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(TAIL_BYTES);
        let mut text = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut text).is_err() {
            return Vec::new();
        }
        let mut lines = text.split(|b| *b == b'\n');
        if start > 0 {
            lines.next(); // a partial first line
        }
        let mut ids: Vec<String> = lines
            .filter_map(|l| serde_json::from_slice::<IdOnly>(l).ok().map(|i| i.id))
            .collect();
        if ids.len() > limit {
            ids.drain(..ids.len() - limit);
        }
        ids
    }
}
