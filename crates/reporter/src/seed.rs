//! The seed's buffer file, imported once at start.
//!
//! The seed's reporter keeps its buffer in memory and, on a clean stop, appends what it could not
//! send to `SCOPE_METRICS_BUFFER_PATH` (default `~/.daydream-scope/metrics_buffer.jsonl`): one API
//! event (`{"type", "data", "id", "timestamp"}`, already mapped) per line. On its next start it
//! loads the lines and truncates the file. This reporter does the same on start, into its disk
//! buffer (which lives beside the file): every line that is a sendable API event is appended
//! verbatim (the stored record of this reporter is exactly an API event), the disk buffer is
//! fsynced, then the file is truncated. A crash between the two imports the lines again next
//! time: duplicates by id, which the collector drops; never a loss. Lines that are not sendable
//! (not JSON, no string `type`, no object `data`, no non-empty string `id`, too large for a
//! request) are skipped, counted and logged: sent, they would have the whole batch refused.

use crate::ReporterConfig;
use spool::Spool;

/// What the import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Imported {
    /// Events moved from the seed's file into the disk buffer.
    pub events: u64,
    /// Lines skipped: not a sendable API event.
    pub skipped: u64,
}

/// Imports the seed's buffer file into the disk buffer, then truncates it; `max_event_bytes` is
/// the largest event a request can carry. Does nothing when there is no file or it is empty;
/// leaves the file alone (and says so) when the disk buffer cannot take it now.
pub(crate) fn import(config: &ReporterConfig, max_event_bytes: usize) -> Imported {
    let mut done = Imported::default();
    let Some(file) = &config.seed_buffer_file else {
        return done;
    };
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return done,
        Err(e) => {
            tracing::warn!(target: "reporter", file = %file.display(), error = %e,
                "metrics reporter: cannot read the seed's buffer file; its events are not imported");
            return done;
        }
    };
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .map(|l| l.trim_ascii())
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return done;
    }
    let Some(dir) = &config.buffer_path else {
        tracing::warn!(target: "reporter", file = %file.display(),
            "metrics reporter: no disk buffer to import the seed's buffer file into; left in place");
        return done;
    };
    let spool = match Spool::open(dir, config.spool.clone()) {
        Ok((spool, _)) => spool,
        Err(e) => {
            tracing::warn!(target: "reporter", file = %file.display(), error = %e,
                "metrics reporter: disk buffer unusable; the seed's buffer file is left in place for the next start");
            return done;
        }
    };
    for line in lines {
        let sendable =
            std::str::from_utf8(line).is_ok_and(|l| telemetry::api_event::check(l).is_ok());
        if line.len() > max_event_bytes || !sendable {
            done.skipped += 1;
            continue;
        }
        if let Err(e) = spool.append(line) {
            tracing::warn!(target: "reporter", file = %file.display(), error = %e, imported = done.events,
                "metrics reporter: the disk buffer failed while importing the seed's buffer file; it is left in place (imported again next start, duplicates dropped by id)");
            return done;
        }
        done.events += 1;
    }
    if let Err(e) = spool.sync() {
        tracing::warn!(target: "reporter", error = %e,
            "metrics reporter: cannot fsync the events imported from the seed's buffer file; the file is left in place");
        return done;
    }
    drop(spool);
    let truncated = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file);
    if let Err(e) = truncated {
        tracing::warn!(target: "reporter", file = %file.display(), error = %e,
            "metrics reporter: cannot truncate the seed's buffer file; its events will be imported again (duplicates dropped by id)");
    }
    tracing::info!(target: "reporter", file = %file.display(), imported = done.events, skipped = done.skipped,
        "metrics reporter: imported the seed's buffer file into the disk buffer (lines that are not sendable metrics API events skipped); the file is truncated, as the seed does");
    done
}
