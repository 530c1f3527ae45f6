//! The one error type of the spool, with messages that name the fix.

use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the spool. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The buffer directory (or a file in it) cannot be created or written.
    #[error(
        "cannot write buffer directory {dir}: permission denied ({action} {path}); \
         set SCOPE_METRICS_BUFFER_PATH to a writable directory (SCOPE_KAFKA_BUFFER_PATH for the Kafka sink), \
         or to an empty string to disable the disk buffer"
    )]
    PermissionDenied {
        /// The buffer directory.
        dir: PathBuf,
        /// What the spool was doing, e.g. `create`.
        action: &'static str,
        /// The exact path that was refused.
        path: PathBuf,
    },

    /// The disk (or the process's file-size limit) is full; the record was not stored and the
    /// log was left as it was before the call.
    #[error(
        "no space left to {action} {path}: {source}; the event was NOT stored (keep it in memory), \
         free disk space or lower the disk buffer's size (max_bytes) so it fits"
    )]
    DiskFull {
        /// What the spool was doing, e.g. `append to`.
        action: &'static str,
        /// The file being written.
        path: PathBuf,
        /// The operating system's error (ENOSPC, EDQUOT or EFBIG).
        source: io::Error,
    },

    /// Another process (or another `Spool` in this one) already has this directory open.
    #[error(
        "buffer directory {dir} is already in use by another process; \
         give each client its own SCOPE_METRICS_BUFFER_PATH (SCOPE_KAFKA_BUFFER_PATH for the Kafka sink)"
    )]
    Locked {
        /// The buffer directory.
        dir: PathBuf,
    },

    /// One record is larger than the spool accepts.
    #[error(
        "event of {len} bytes is larger than the disk buffer accepts ({max} bytes); \
         it was not stored: shrink the event or raise max_record_bytes / max_bytes"
    )]
    RecordTooLarge {
        /// The payload's size in bytes.
        len: usize,
        /// The largest payload accepted with the current options.
        max: u64,
    },

    /// The options make no sense together.
    #[error("invalid disk buffer options: {0}")]
    InvalidOptions(String),

    /// Any other I/O failure, with the file involved.
    #[error(
        "cannot {action} {path}: {source}; check that the disk is healthy and that \
         SCOPE_METRICS_BUFFER_PATH (SCOPE_KAFKA_BUFFER_PATH for the Kafka sink) points at a local, \
         writable directory"
    )]
    Io {
        /// What the spool was doing, e.g. `read`.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
}

impl SpoolError {
    /// Classifies an I/O error so the caller gets the variant (and message) that names the fix.
    pub(crate) fn io(dir: &Path, action: &'static str, path: &Path, source: io::Error) -> Self {
        if is_disk_full(&source) {
            return SpoolError::DiskFull {
                action,
                path: path.to_owned(),
                source,
            };
        }
        match source.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                SpoolError::PermissionDenied {
                    dir: dir.to_owned(),
                    action,
                    path: path.to_owned(),
                }
            }
            _ => SpoolError::Io {
                action,
                path: path.to_owned(),
                source,
            },
        }
    }

    /// True for errors where the caller should keep the event elsewhere (disk full, too large).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull { .. })
    }
}

/// ENOSPC, EDQUOT and EFBIG (file-size limit) all mean "no room for this write".
fn is_disk_full(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::FileTooLarge {
        return true;
    }
    matches!(e.raw_os_error(), Some(code) if code == libc::ENOSPC || code == libc::EDQUOT || code == libc::EFBIG)
}
