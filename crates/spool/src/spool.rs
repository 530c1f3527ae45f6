//! The spool itself: append with group commit, read from the head, acknowledge, cap.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::SpoolError;
use crate::format::{self, HEADER_LEN};
use crate::recovery::{self, create_segment, sync_dir};
use crate::{Record, RecoveryReport, SpoolOptions, SyncPolicy};

/// Reads from segment files are done in chunks of this size (or one record, when larger).
const READ_CHUNK: usize = 256 << 10;
/// How long the background syncer waits before retrying after a failed fsync.
const SYNC_RETRY: Duration = Duration::from_secs(1);

/// One segment file, as the spool keeps track of it.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Id of its first record (also in its name).
    pub first_id: u64,
    /// One past the id of its last record.
    pub end_id: u64,
    /// Bytes of records in it (the file is never longer once recovered).
    pub size: u64,
    /// Where it lives.
    pub path: PathBuf,
}

/// A record's place: record `id` starts at byte `off` of the segment that begins at id `seg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    seg: u64,
    id: u64,
    off: u64,
}

/// Everything behind the mutex.
struct State {
    /// Oldest first; never empty; the last one is appended to.
    segments: VecDeque<Segment>,
    /// The last segment's file.
    active: Arc<File>,
    next_id: u64,
    /// Every id below this is acknowledged.
    ack_next: u64,
    /// Where reading starts: in `segments[0]`, at or before the first unacknowledged record
    /// (reads skip acknowledged ones, so a stale head costs time, never correctness).
    head: Pos,
    /// Just past the last record the latest `read_batch` returned, to make the usual ack O(1).
    read_hint: Option<Pos>,
    total_bytes: u64,
    dropped_total: u64,
    dropped_untaken: u64,
    /// Every id below this is fsynced.
    synced_id: u64,
    /// An fsync is in flight (its leader released the lock while it runs).
    syncing: bool,
    /// When the oldest append not covered by an fsync happened; `None` when none waits.
    dirty_since: Option<Instant>,
    unsynced_bytes: u64,
    /// Closed segments whose data may still need an fsync.
    pending_sync: Vec<Arc<File>>,
    /// A segment file was created or deleted since the directory was last fsynced.
    dir_dirty: bool,
    shutdown: bool,
    /// Reused framing buffer, so an append allocates nothing.
    scratch: Vec<u8>,
}

/// State shared with the background syncer.
struct Shared {
    dir: PathBuf,
    opts: SpoolOptions,
    state: Mutex<State>,
    /// Signalled when an fsync finishes.
    synced_cv: Condvar,
    /// Wakes the background syncer.
    syncer_cv: Condvar,
    /// Serializes acks, whose fsyncs run without the state lock.
    ack_lock: Mutex<()>,
    /// Holds the directory's flock for as long as the spool lives.
    _lock: File,
}

/// A crash-safe, segmented, append-only disk buffer; see the crate docs for the guarantees.
pub struct Spool {
    shared: Arc<Shared>,
    syncer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.shared.dir)
            .field("len", &self.len())
            .finish()
    }
}

impl Spool {
    /// Opens the spool in `dir` (created if missing), recovering whatever a previous run left:
    /// torn or corrupt tails are truncated and reported, never replayed.
    pub fn open(
        dir: impl AsRef<Path>,
        opts: SpoolOptions,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        validate(&opts)?;
        let dir = dir.as_ref().to_owned();
        let (rec, report) = recovery::recover(&dir, &opts)?;
        let seg0 = &rec.segments[0];
        let head_id = rec.ack_next.max(seg0.first_id).min(seg0.end_id);
        let head = Pos {
            seg: seg0.first_id,
            id: head_id,
            off: rec.head_off,
        };
        let total_bytes = rec.segments.iter().map(|s| s.size).sum();
        let state = State {
            segments: rec.segments,
            active: rec.active,
            next_id: rec.next_id,
            ack_next: rec.ack_next,
            head,
            read_hint: None,
            total_bytes,
            dropped_total: 0,
            dropped_untaken: 0,
            synced_id: rec.next_id,
            syncing: false,
            dirty_since: None,
            unsynced_bytes: 0,
            pending_sync: Vec::new(),
            dir_dirty: false,
            shutdown: false,
            scratch: Vec::new(),
        };
        let shared = Arc::new(Shared {
            dir,
            opts,
            state: Mutex::new(state),
            synced_cv: Condvar::new(),
            syncer_cv: Condvar::new(),
            ack_lock: Mutex::new(()),
            _lock: rec.lock,
        });
        let syncer = match shared.opts.sync {
            SyncPolicy::Group {
                interval,
                max_unsynced_bytes,
            } => {
                let s = Arc::clone(&shared);
                let handle = std::thread::Builder::new()
                    .name("spool-sync".into())
                    .spawn(move || s.syncer_loop(interval, max_unsynced_bytes))
                    .map_err(|e| SpoolError::Io {
                        action: "start the fsync thread for",
                        path: shared.dir.clone(),
                        source: e,
                    })?;
                Some(handle)
            }
            SyncPolicy::Always | SyncPolicy::Never => None,
        };
        if report.records > 0 || report.truncated_bytes > 0 || report.ack_file_invalid {
            tracing::info!(dir = %shared.dir.display(), "disk buffer recovered: {report}");
        }
        Ok((Spool { shared, syncer }, report))
    }

    /// Appends one record and returns its id. When this returns `Ok`, the record survives a
    /// crash of the process; it survives power loss after the next group commit (see
    /// [`SyncPolicy`]). May drop the oldest segments to stay under `max_bytes` (counted in
    /// [`Spool::dropped_records`]). On error nothing was stored and the log is unchanged, with
    /// one exception: under `SyncPolicy::Always` a failed fsync is reported after the record was
    /// written, so it is in the log (and survives a process crash) but maybe not a power loss.
    pub fn append(&self, payload: &[u8]) -> Result<u64, SpoolError> {
        let sh = &*self.shared;
        let max = max_payload(&sh.opts);
        if payload.len() as u64 > max {
            return Err(SpoolError::RecordTooLarge {
                len: payload.len(),
                max,
            });
        }
        let framed = HEADER_LEN + payload.len() as u64;
        let mut st = sh.state.lock();
        st.make_room(sh, framed)?;
        let id = st.next_id;
        let mut scratch = std::mem::take(&mut st.scratch);
        format::encode_record(payload, &mut scratch);
        let off = st.active_seg().size;
        let written = st.active.write_all_at(&scratch, off);
        st.scratch = scratch;
        if let Err(e) = written {
            // Cut a short write back so the file ends on a whole record; should that fail too,
            // the next append still writes at `off` and recovery cuts whatever is left beyond.
            if let Err(te) = st.active.set_len(off) {
                tracing::warn!(error = %te, "disk buffer: cannot truncate a failed append");
            }
            let path = st.active_seg().path.clone();
            return Err(SpoolError::io(&sh.dir, "append to", &path, e));
        }
        let seg = st.active_seg_mut();
        seg.size += framed;
        seg.end_id = id + 1;
        st.next_id = id + 1;
        st.total_bytes += framed;
        match sh.opts.sync {
            SyncPolicy::Never => {}
            SyncPolicy::Always => {
                drop(st);
                sh.sync_to(id + 1)?;
            }
            SyncPolicy::Group {
                max_unsynced_bytes, ..
            } => {
                let before = st.unsynced_bytes;
                st.unsynced_bytes += framed;
                if st.dirty_since.is_none() {
                    st.dirty_since = Some(Instant::now());
                    sh.syncer_cv.notify_one();
                } else if before < max_unsynced_bytes && st.unsynced_bytes >= max_unsynced_bytes {
                    sh.syncer_cv.notify_one();
                }
            }
        }
        Ok(id)
    }

    /// Waits until every record appended before this call is fsynced (survives power loss).
    pub fn sync(&self) -> Result<(), SpoolError> {
        let target = self.shared.state.lock().next_id;
        self.shared.sync_to(target)
    }

    /// Returns up to `max_records` records from the oldest unacknowledged one, stopping before
    /// the payloads would exceed `max_bytes` in total; the first record is returned even when it
    /// alone is larger, so an oversized event can never wedge the queue. Reading does not
    /// consume: the same records come back until they are acknowledged. A record found corrupt
    /// on disk is cut off with the rest of its segment and counted as dropped.
    pub fn read_batch(
        &self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, SpoolError> {
        let sh = &*self.shared;
        let mut out = Vec::new();
        if max_records == 0 {
            return Ok(out);
        }
        let mut st = sh.state.lock();
        let mut bytes = 0usize;
        let mut idx = 0;
        'segments: while idx < st.segments.len() {
            let (first_id, end_id, size) = {
                let s = &st.segments[idx];
                (s.first_id, s.end_id, s.size)
            };
            let mut pos = if idx == 0 {
                st.head
            } else {
                Pos {
                    seg: first_id,
                    id: first_id,
                    off: 0,
                }
            };
            if pos.id < end_id {
                let file = match st.segment_file(idx) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        st.cut_segment(sh, idx, pos)?;
                        idx += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(SpoolError::io(&sh.dir, "open", &st.segments[idx].path, e))
                    }
                };
                let mut reader = ChunkReader {
                    file,
                    limit: size,
                    buf: Vec::new(),
                    start: 0,
                };
                while pos.id < end_id {
                    let payload = match reader.record(pos.off) {
                        Ok(Some(p)) => p,
                        Ok(None) => {
                            st.cut_segment(sh, idx, pos)?;
                            break;
                        }
                        Err(e) => {
                            return Err(SpoolError::io(&sh.dir, "read", &st.segments[idx].path, e))
                        }
                    };
                    let acked = pos.id < st.ack_next;
                    if !acked && !out.is_empty() && bytes + payload.len() > max_bytes {
                        break 'segments;
                    }
                    let id = pos.id;
                    pos.id += 1;
                    pos.off += HEADER_LEN + payload.len() as u64;
                    if acked {
                        // A stale head (see `State::head`): move it past what is acknowledged.
                        if idx == 0 {
                            st.head = pos;
                        }
                        continue;
                    }
                    bytes += payload.len();
                    out.push(Record { id, payload });
                    st.read_hint = Some(pos);
                    if out.len() >= max_records {
                        break 'segments;
                    }
                }
            }
            idx += 1;
        }
        Ok(out)
    }

    /// Acknowledges every record with an id up to and including `up_to` (ids past the last
    /// appended one are clamped to it). Durable when it returns: the cursor is replaced
    /// atomically and fsynced; fully acknowledged segment files are deleted. Returns how many
    /// records this call acknowledged: those an earlier ack or the size cap removed are not
    /// counted again (so a caller racing the cap counts each record once).
    pub fn ack(&self, up_to: u64) -> Result<u64, SpoolError> {
        let sh = &*self.shared;
        let _serial = sh.ack_lock.lock();
        let new_next = {
            let st = sh.state.lock();
            let n = up_to.saturating_add(1).min(st.next_id);
            if n <= st.ack_next {
                return Ok(0);
            }
            n
        };
        sh.write_ack(new_next)?;
        let mut st = sh.state.lock();
        let acked = st.present_between(st.ack_next, new_next);
        st.ack_next = st.ack_next.max(new_next);
        st.reclaim_acked(sh);
        Ok(acked)
    }

    /// Unacknowledged records.
    pub fn len(&self) -> u64 {
        self.shared.state.lock().unacked()
    }

    /// True when every record is acknowledged (or dropped).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes in the segment files (framing included), which `max_bytes` caps. Acknowledged
    /// records that share a segment with unacknowledged ones count until the segment goes.
    pub fn bytes(&self) -> u64 {
        self.shared.state.lock().total_bytes
    }

    /// Unacknowledged records dropped since this spool was opened: by the size cap, or cut
    /// because they were found corrupt while reading.
    pub fn dropped_records(&self) -> u64 {
        self.shared.state.lock().dropped_total
    }

    /// Records dropped since the previous call, for reporting downstream (`telemetry_dropped`).
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.shared.state.lock().dropped_untaken)
    }

    /// Records appended but not yet fsynced: they survive a process crash, not a power loss.
    /// At most about `interval` worth under group commit, always 0 under `Always`.
    pub fn unsynced_records(&self) -> u64 {
        let st = self.shared.state.lock();
        st.next_id.saturating_sub(st.synced_id)
    }

    /// The buffer directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Drop for Spool {
    /// Stops the background syncer and, unless the policy is `Never`, fsyncs what is left.
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.syncer_cv.notify_all();
        if let Some(h) = self.syncer.take() {
            let _ = h.join();
        }
        if self.shared.opts.sync != SyncPolicy::Never {
            if let Err(e) = self.sync() {
                tracing::warn!(error = %e, "disk buffer: final fsync on close failed");
            }
        }
    }
}

/// The largest payload the options accept: `max_record_bytes`, the cap, and the u32 length field.
fn max_payload(opts: &SpoolOptions) -> u64 {
    (opts.max_record_bytes as u64)
        .min(opts.max_bytes.saturating_sub(HEADER_LEN))
        .min(u64::from(u32::MAX))
}

/// Rejects options that cannot work, before touching the disk.
fn validate(opts: &SpoolOptions) -> Result<(), SpoolError> {
    if opts.segment_bytes == 0 {
        return Err(SpoolError::InvalidOptions(
            "segment_bytes must be above 0".into(),
        ));
    }
    if opts.max_bytes <= HEADER_LEN {
        return Err(SpoolError::InvalidOptions(format!(
            "max_bytes must be above {HEADER_LEN} (the framing of one record), got {}",
            opts.max_bytes
        )));
    }
    Ok(())
}

impl Shared {
    /// Group commit: returns once every id below `target` is fsynced. The first caller to find
    /// no fsync running leads one (without the lock) that covers every append so far; the
    /// others wait for it.
    fn sync_to(&self, target: u64) -> Result<(), SpoolError> {
        let mut st = self.state.lock();
        loop {
            if st.synced_id >= target {
                return Ok(());
            }
            if st.syncing {
                self.synced_cv.wait(&mut st);
                continue;
            }
            st.syncing = true;
            let upto = st.next_id;
            let mut files = std::mem::take(&mut st.pending_sync);
            let pending = files.len();
            files.push(Arc::clone(&st.active));
            let dir_dirty = std::mem::replace(&mut st.dir_dirty, false);
            let unsynced = std::mem::take(&mut st.unsynced_bytes);
            let since = st.dirty_since.take();
            // Under `Never` closed segments are not tracked for fsync; an explicit sync covers
            // them all (it is rare there).
            let closed: Vec<PathBuf> = if self.opts.sync == SyncPolicy::Never {
                let n = st.segments.len() - 1;
                st.segments.iter().take(n).map(|s| s.path.clone()).collect()
            } else {
                Vec::new()
            };
            let res = MutexGuard::unlocked(&mut st, || {
                for f in &files {
                    f.sync_data()?;
                }
                for p in &closed {
                    match File::open(p) {
                        Ok(f) => f.sync_data()?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                if dir_dirty {
                    sync_dir(&self.dir)?;
                }
                Ok::<(), io::Error>(())
            });
            st.syncing = false;
            self.synced_cv.notify_all();
            if let Err(e) = res {
                files.truncate(pending);
                st.pending_sync.extend(files);
                st.dir_dirty |= dir_dirty;
                st.unsynced_bytes += unsynced;
                st.dirty_since = match (since, st.dirty_since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Err(SpoolError::io(&self.dir, "fsync", &self.dir, e));
            }
            st.synced_id = st.synced_id.max(upto);
        }
    }

    /// The background loop of `SyncPolicy::Group`: fsync `interval` after the first unsynced
    /// append, or early once `max_unsynced_bytes` wait.
    fn syncer_loop(&self, interval: Duration, max_unsynced_bytes: u64) {
        let mut st = self.state.lock();
        while !st.shutdown {
            let Some(since) = st.dirty_since else {
                self.syncer_cv.wait(&mut st);
                continue;
            };
            let deadline = since + interval;
            if Instant::now() < deadline && st.unsynced_bytes < max_unsynced_bytes {
                self.syncer_cv.wait_until(&mut st, deadline);
                continue;
            }
            let target = st.next_id;
            if let Err(e) = MutexGuard::unlocked(&mut st, || self.sync_to(target)) {
                tracing::warn!(error = %e, "disk buffer: background fsync failed; retrying");
                if !st.shutdown {
                    self.syncer_cv.wait_for(&mut st, SYNC_RETRY);
                }
            }
        }
    }

    /// Replaces the `ack` file atomically: write `ack.tmp`, fsync, rename, fsync the directory.
    fn write_ack(&self, next_unacked: u64) -> Result<(), SpoolError> {
        let tmp = self.dir.join(format::ACK_TMP_FILE);
        let dst = self.dir.join(format::ACK_FILE);
        let durable = self.opts.sync != SyncPolicy::Never;
        let err = |action, path: &Path, e| SpoolError::io(&self.dir, action, path, e);
        let mut f = File::create(&tmp).map_err(|e| err("create", &tmp, e))?;
        f.write_all(&format::encode_ack(next_unacked))
            .map_err(|e| err("write", &tmp, e))?;
        if durable {
            f.sync_all().map_err(|e| err("fsync", &tmp, e))?;
        }
        drop(f);
        fs::rename(&tmp, &dst).map_err(|e| err("rename", &dst, e))?;
        if durable {
            sync_dir(&self.dir).map_err(|e| err("fsync", &self.dir, e))?;
        }
        Ok(())
    }
}

impl State {
    fn active_seg(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    fn active_seg_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    fn unacked(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.end_id - s.first_id.max(self.ack_next).min(s.end_id))
            .sum()
    }

    /// Records still in a segment file with an id in `from..to`.
    fn present_between(&self, from: u64, to: u64) -> u64 {
        self.segments
            .iter()
            .map(|s| s.end_id.min(to).saturating_sub(s.first_id.max(from)))
            .sum()
    }

    /// A handle to read segment `idx`: the active one's own, or a fresh read-only open.
    fn segment_file(&self, idx: usize) -> io::Result<Arc<File>> {
        if idx + 1 == self.segments.len() {
            Ok(Arc::clone(&self.active))
        } else {
            File::open(&self.segments[idx].path).map(Arc::new)
        }
    }

    /// Starts a new, empty active segment at `next_id`.
    fn roll(&mut self, sh: &Shared) -> Result<(), SpoolError> {
        let path = format::segment_path(&sh.dir, self.next_id);
        let file =
            create_segment(&path).map_err(|e| SpoolError::io(&sh.dir, "create", &path, e))?;
        let old = std::mem::replace(&mut self.active, Arc::new(file));
        if sh.opts.sync != SyncPolicy::Never && self.synced_id < self.next_id {
            self.pending_sync.push(old);
        }
        self.dir_dirty = true;
        self.segments.push_back(Segment {
            first_id: self.next_id,
            end_id: self.next_id,
            size: 0,
            path,
        });
        Ok(())
    }

    /// Deletes the oldest segment file. A file that cannot be deleted is forgotten anyway (and
    /// logged): its ids are below every kept one, so a later recovery handles it consistently.
    fn pop_front(&mut self) -> Option<Segment> {
        let seg = self.segments.pop_front()?;
        if let Err(e) = fs::remove_file(&seg.path) {
            tracing::error!(path = %seg.path.display(), error = %e, "disk buffer: cannot delete a segment file");
        }
        self.total_bytes -= seg.size;
        self.dir_dirty = true;
        Some(seg)
    }

    /// Makes room for a record of `framed` bytes: rolls a full segment, then drops the oldest
    /// segments (counting their unacknowledged records) while the cap would be exceeded.
    fn make_room(&mut self, sh: &Shared, framed: u64) -> Result<(), SpoolError> {
        let active = self.active_seg().size;
        if active > 0 && active + framed > sh.opts.segment_bytes {
            self.roll(sh)?;
        }
        let mut dropped = 0;
        while self.total_bytes + framed > sh.opts.max_bytes {
            if self.segments.len() == 1 {
                // Only the active segment is left and it is in the way: start a fresh one.
                self.roll(sh)?;
            }
            if let Some(seg) = self.pop_front() {
                dropped += seg.end_id - seg.first_id.max(self.ack_next).min(seg.end_id);
            }
        }
        if dropped > 0 {
            self.dropped_total += dropped;
            self.dropped_untaken += dropped;
            tracing::warn!(
                dropped,
                "disk buffer full: dropped the oldest unacknowledged events"
            );
        }
        self.fix_head(sh);
        Ok(())
    }

    /// After the cursor moved: deletes fully acknowledged segments, rolls the active one when it
    /// is entirely acknowledged (so its space comes back at once), and moves the head.
    fn reclaim_acked(&mut self, sh: &Shared) {
        while self.segments.len() > 1 && self.segments[0].end_id <= self.ack_next {
            self.pop_front();
        }
        let only = self.active_seg();
        if self.segments.len() == 1 && only.end_id <= self.ack_next && only.size > 0 {
            match self.roll(sh) {
                Ok(()) => {
                    self.pop_front();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "disk buffer: cannot start a new segment after a full ack")
                }
            }
        }
        self.fix_head(sh);
    }

    /// Points `head` at the first unacknowledged record of `segments[0]`, using the last read's
    /// end when it matches (the usual read-then-ack) and scanning headers otherwise.
    fn fix_head(&mut self, sh: &Shared) {
        let seg0 = &self.segments[0];
        let target = self.ack_next.max(seg0.first_id).min(seg0.end_id);
        if self.head.seg != seg0.first_id || self.head.id > target {
            self.head = Pos {
                seg: seg0.first_id,
                id: seg0.first_id,
                off: 0,
            };
        }
        if self.head.id == target {
            return;
        }
        if target == seg0.end_id {
            self.head = Pos {
                seg: seg0.first_id,
                id: target,
                off: seg0.size,
            };
            return;
        }
        if let Some(h) = self
            .read_hint
            .filter(|h| h.seg == seg0.first_id && h.id == target)
        {
            self.head = h;
            return;
        }
        match self.locate(0, self.head, target) {
            Ok(pos) => self.head = pos,
            // Leave the head behind: reads skip acknowledged records, so this only costs time.
            Err(e) => {
                tracing::warn!(error = %e, path = %sh.dir.display(), "disk buffer: cannot locate the head")
            }
        }
    }

    /// Walks record headers of segment `idx` from `from` to record `target`.
    fn locate(&self, idx: usize, from: Pos, target: u64) -> io::Result<Pos> {
        let file = self.segment_file(idx)?;
        let size = self.segments[idx].size;
        let mut pos = from;
        while pos.id < target {
            let mut h = [0u8; HEADER_LEN as usize];
            file.read_exact_at(&mut h, pos.off)?;
            let (len, _) = format::decode_header(&h);
            let next = pos.off + HEADER_LEN + u64::from(len);
            if next > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "record runs past the segment's end",
                ));
            }
            pos = Pos {
                seg: pos.seg,
                id: pos.id + 1,
                off: next,
            };
        }
        Ok(pos)
    }

    /// Cuts segment `idx` at `at` (a record found corrupt while reading): the records from there
    /// to the segment's end are counted as dropped and the file is truncated. The active segment
    /// is first closed, so later appends go to a new segment and ids stay contiguous per file.
    fn cut_segment(&mut self, sh: &Shared, idx: usize, at: Pos) -> Result<(), SpoolError> {
        if idx + 1 == self.segments.len() {
            self.roll(sh)?;
        }
        let ack_next = self.ack_next;
        let seg = &mut self.segments[idx];
        let lost = seg.end_id - at.id.max(ack_next).min(seg.end_id);
        tracing::error!(
            path = %seg.path.display(), offset = at.off, lost,
            "disk buffer: corrupt record found while reading; cutting the segment there"
        );
        let truncated = fs::OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .and_then(|f| f.set_len(at.off));
        if let Err(e) = truncated {
            tracing::warn!(path = %seg.path.display(), error = %e, "disk buffer: cannot truncate a corrupt segment");
        }
        let cut = seg.size - at.off;
        seg.size = at.off;
        seg.end_id = at.id;
        self.total_bytes -= cut;
        self.dropped_total += lost;
        self.dropped_untaken += lost;
        self.read_hint = None;
        Ok(())
    }
}

/// Reads records of one segment through a chunk buffer: one `pread` per chunk, not per record.
struct ChunkReader {
    file: Arc<File>,
    /// The segment's logical size; nothing past it is read.
    limit: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
}

impl ChunkReader {
    /// The payload of the record at `off`; `None` when it is short or fails its CRC.
    fn record(&mut self, off: u64) -> io::Result<Option<Vec<u8>>> {
        let Some(header) = self.bytes(off, HEADER_LEN)? else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN as usize];
        h.copy_from_slice(header);
        let (len, crc) = format::decode_header(&h);
        let Some(payload) = self.bytes(off + HEADER_LEN, u64::from(len))? else {
            return Ok(None);
        };
        if format::record_crc(len.to_le_bytes(), payload) != crc {
            return Ok(None);
        }
        Ok(Some(payload.to_vec()))
    }

    /// `len` bytes at `off`, refilling the buffer when needed; `None` when they are not there.
    fn bytes(&mut self, off: u64, len: u64) -> io::Result<Option<&[u8]>> {
        if off.checked_add(len).is_none_or(|end| end > self.limit) {
            return Ok(None);
        }
        let have = off >= self.start && off + len <= self.start + self.buf.len() as u64;
        if !have {
            let n = len.max(READ_CHUNK as u64).min(self.limit - off) as usize;
            self.buf.resize(n, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buf, off) {
                self.buf.clear();
                return if e.kind() == io::ErrorKind::UnexpectedEof {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            self.start = off;
        }
        let at = (off - self.start) as usize;
        Ok(Some(&self.buf[at..at + len as usize]))
    }
}
