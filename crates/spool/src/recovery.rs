//! Opening a spool directory: lock it, read the cursor, scan every segment, cut what is torn.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::SpoolError;
use crate::format::{self, HEADER_LEN};
use crate::spool::Segment;
use crate::{RecoveryReport, SpoolOptions, SyncPolicy};

/// The state a spool starts from.
pub(crate) struct Recovered {
    /// Segments kept, oldest first; never empty, the last is the active one.
    pub segments: VecDeque<Segment>,
    /// The last segment, open for appending.
    pub active: Arc<File>,
    /// The id the next append gets.
    pub next_id: u64,
    /// The next unacknowledged id.
    pub ack_next: u64,
    /// Offset in the first segment of the first unacknowledged record.
    pub head_off: u64,
    /// The flock(2)ed `LOCK` file; the lock lasts as long as this handle.
    pub lock: File,
}

/// What scanning one segment found.
struct Scan {
    /// One past the last valid record's id.
    end_id: u64,
    /// Bytes of valid records from the start of the file.
    valid_len: u64,
    /// The file's size on disk.
    file_len: u64,
    /// Offset of the record with the wanted id, if the segment spans it.
    want_off: Option<u64>,
}

/// One segment as found on disk, before the keep-or-delete decision.
struct Found {
    first_id: u64,
    path: PathBuf,
    file: File,
    scan: Scan,
}

/// Opens (creating if needed) and recovers the spool in `dir`.
pub(crate) fn recover(
    dir: &Path,
    opts: &SpoolOptions,
) -> Result<(Recovered, RecoveryReport), SpoolError> {
    let err = |action, path: &Path, e| SpoolError::io(dir, action, path, e);
    fs::create_dir_all(dir).map_err(|e| err("create", dir, e))?;
    let lock = lock_dir(dir)?;
    let syncing = opts.sync != SyncPolicy::Never;
    let mut report = RecoveryReport::default();

    let tmp = dir.join(format::ACK_TMP_FILE);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("remove", &tmp, e)),
    }
    let ack_path = dir.join(format::ACK_FILE);
    let ack_next = match fs::read(&ack_path) {
        Ok(bytes) => match format::decode_ack(&bytes) {
            Some(id) => id,
            None => {
                tracing::warn!(path = %ack_path.display(), "disk buffer ack file is invalid; redelivering everything buffered");
                report.ack_file_invalid = true;
                0
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(err("read", &ack_path, e)),
    };

    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| err("list", dir, e))? {
        let entry = entry.map_err(|e| err("list", dir, e))?;
        let name = entry.file_name();
        match name.to_str().and_then(format::parse_segment_name) {
            Some(first_id) => names.push((first_id, entry.path())),
            None => {
                let known = [format::ACK_FILE, format::LOCK_FILE];
                if !name.to_str().is_some_and(|n| known.contains(&n)) {
                    tracing::debug!(file = ?name, "ignoring unknown file in disk buffer directory");
                }
            }
        }
    }
    names.sort_by_key(|(id, _)| *id);

    let mut found: Vec<Found> = Vec::with_capacity(names.len());
    let mut dir_changed = false;
    for (i, (first_id, path)) in names.iter().enumerate() {
        let limit = names.get(i + 1).map_or(u64::MAX, |(next, _)| *next);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err("open", path, e))?;
        let scan =
            scan_segment(&file, *first_id, limit, ack_next).map_err(|e| err("read", path, e))?;
        if scan.valid_len < scan.file_len {
            let cut = scan.file_len - scan.valid_len;
            let lost = match names.get(i + 1) {
                Some((next, _)) => next.saturating_sub(scan.end_id).max(1),
                None => 1,
            };
            tracing::warn!(
                path = %path.display(), valid_records = scan.end_id - first_id, cut_bytes = cut,
                "disk buffer segment has a torn or corrupt tail; truncating it"
            );
            file.set_len(scan.valid_len)
                .map_err(|e| err("truncate", path, e))?;
            if syncing {
                file.sync_all().map_err(|e| err("fsync", path, e))?;
            }
            report.truncated_bytes += cut;
            report.corrupt_records += lost;
        }
        found.push(Found {
            first_id: *first_id,
            path: path.clone(),
            file,
            scan,
        });
    }

    let next_id = found.iter().map(|f| f.scan.end_id).fold(ack_next, u64::max);
    let last = found.len().checked_sub(1);
    let mut kept: Vec<Found> = Vec::with_capacity(found.len());
    for (i, f) in found.into_iter().enumerate() {
        let empty = f.scan.end_id == f.first_id;
        let valid_empty_tail = empty && Some(i) == last && f.first_id == next_id;
        let useless = if empty {
            !valid_empty_tail
        } else {
            f.scan.end_id <= ack_next
        };
        if useless {
            fs::remove_file(&f.path).map_err(|e| err("remove", &f.path, e))?;
            dir_changed = true;
        } else {
            kept.push(f);
        }
    }
    if kept.last().is_none_or(|f| f.scan.end_id != next_id) {
        let path = format::segment_path(dir, next_id);
        let file = create_segment(&path).map_err(|e| err("create", &path, e))?;
        dir_changed = true;
        let scan = Scan {
            end_id: next_id,
            valid_len: 0,
            file_len: 0,
            want_off: Some(0),
        };
        kept.push(Found {
            first_id: next_id,
            path,
            file,
            scan,
        });
    }
    if dir_changed && syncing {
        sync_dir(dir).map_err(|e| err("fsync", dir, e))?;
    }

    let head_off = {
        let first = &kept[0];
        if ack_next <= first.first_id {
            0
        } else {
            // `ack_next` lies inside the first kept segment, which the scan located.
            first.scan.want_off.unwrap_or(first.scan.valid_len)
        }
    };
    let mut segments = VecDeque::with_capacity(kept.len());
    let mut active = None;
    let count = kept.len();
    for (i, f) in kept.into_iter().enumerate() {
        report.records += f.scan.end_id - f.first_id.max(ack_next).min(f.scan.end_id);
        segments.push_back(Segment {
            first_id: f.first_id,
            end_id: f.scan.end_id,
            size: f.scan.valid_len,
            path: f.path,
        });
        if i + 1 == count {
            active = Some(Arc::new(f.file));
        }
    }
    report.segments = segments.len();
    let Some(active) = active else {
        return Err(SpoolError::InvalidOptions(
            "internal: recovery kept no segment".into(),
        ));
    };
    Ok((
        Recovered {
            segments,
            active,
            next_id,
            ack_next,
            head_off,
            lock,
        },
        report,
    ))
}

/// Reads records from the start of `file` until the first one that is short or fails its CRC, or
/// until `limit_id` (the next segment's first id).
fn scan_segment(file: &File, first_id: u64, limit_id: u64, want_id: u64) -> io::Result<Scan> {
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut payload = Vec::new();
    let (mut id, mut off, mut want_off) = (first_id, 0u64, None);
    loop {
        if id == want_id {
            want_off = Some(off);
        }
        if id >= limit_id || file_len - off < HEADER_LEN {
            break;
        }
        let mut header = [0u8; HEADER_LEN as usize];
        reader.read_exact(&mut header)?;
        let (len, crc) = format::decode_header(&header);
        if file_len - off - HEADER_LEN < u64::from(len) {
            break;
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        if format::record_crc(len.to_le_bytes(), &payload) != crc {
            break;
        }
        off += HEADER_LEN + u64::from(len);
        id += 1;
    }
    Ok(Scan {
        end_id: id,
        valid_len: off,
        file_len,
        want_off,
    })
}

/// Creates a new, empty segment file open for reading and appending.
pub(crate) fn create_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// fsyncs a directory, making file creations, renames and deletions in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes an exclusive, non-blocking flock(2) on `dir/LOCK`, so two processes never share a log.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(format::LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| SpoolError::io(dir, "create", &path, e))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(SpoolError::Locked {
                dir: dir.to_owned(),
            });
        }
        return Err(SpoolError::io(dir, "lock", &path, e));
    }
    Ok(file)
}
