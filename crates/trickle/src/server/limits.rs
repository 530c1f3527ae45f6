//! How many connections and channels a server may hold, sized from the process's open-file limit.
//!
//! Every connection is a file descriptor, so the open-file limit (`ulimit -n`) is the real ceiling
//! on connections: past it `accept` fails, and clients see connections that hang or reset. The
//! server therefore sizes `max_connections` just under it (answering `503` and closing is better
//! than failing to accept), and `max_channels` from that (a live channel has at least a publisher
//! and a subscriber connection). [`raise_open_file_limit`] first lifts the soft limit to the hard
//! one, as Go programs (and so the reference server) do at start-up.
//!
//! A session of the relay holds eight connections on the server in flight (each of its two
//! channels has a streaming and a preconnected request at each end), plus the clients' idle
//! keep-alive ones: about 9 in all (`bench sessions` at 1,000 sessions: 9,138 connections), so
//! 10,000 sessions need about 90,000.

/// The open-file limit of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit: what the process may open now.
    pub soft: u64,
    /// The hard limit: how far the soft limit may be raised without privileges.
    pub hard: u64,
    /// The soft limit before [`raise_open_file_limit`] raised it, if it did.
    pub raised_from: Option<u64>,
}

/// What a system without a readable limit is assumed to allow (the usual default soft limit).
const ASSUMED: u64 = 1024;

/// The process's open-file limit (`RLIMIT_NOFILE`); `ulimit -n`'s default when unreadable.
pub fn open_file_limit() -> OpenFiles {
    let (soft, hard) = get_nofile().unwrap_or((ASSUMED, ASSUMED));
    OpenFiles {
        soft,
        hard,
        raised_from: None,
    }
}

/// Raises the soft open-file limit to `want` (all of the hard limit when `None`). When `want` is
/// above the hard limit, the hard limit is raised too where the process may (root, or
/// `CAP_SYS_RESOURCE`; at most `/proc/sys/fs/nr_open`); otherwise the soft limit stops at the hard
/// one. Never lowers a limit. Returns the limit in force afterwards.
pub fn raise_open_file_limit(want: Option<u64>) -> OpenFiles {
    let before = open_file_limit();
    let target = want.unwrap_or(before.hard).max(before.soft);
    if target <= before.soft {
        return before;
    }
    let mut hard = before.hard;
    if target > hard {
        let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(hard);
        let new_hard = target.min(ceiling).max(hard);
        // Unprivileged processes may not raise the hard limit: then the soft one stops at it.
        if new_hard > hard && set_nofile(new_hard, new_hard) {
            hard = new_hard;
        }
    }
    let soft = target.min(hard);
    if soft > before.soft && !set_nofile(soft, hard) {
        return before;
    }
    let after = open_file_limit();
    OpenFiles {
        raised_from: (after.soft > before.soft).then_some(before.soft),
        ..after
    }
}

/// `(max_connections, max_channels)` for a process that may open `open_files` descriptors: all
/// of them but a reserve (an eighth, at least 32 and at most 1,024) for the listener, log files
/// and the process's own clients; channels half that (a live channel has at least two
/// connections), and never fewer than 10,000 (a channel nobody connects to costs no descriptor).
pub fn sized_limits(open_files: u64) -> (usize, usize) {
    let reserve = (open_files / 8).clamp(32, 1024);
    let connections = open_files.saturating_sub(reserve).max(1);
    let connections = usize::try_from(connections).unwrap_or(usize::MAX);
    (connections, (connections / 2).max(10_000))
}

#[cfg(unix)]
// `rlim_t` is u64 on Linux, not on every Unix.
#[allow(clippy::unnecessary_cast)]
fn get_nofile() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some((lim.rlim_cur as u64, lim.rlim_max as u64))
}

#[cfg(unix)]
fn set_nofile(soft: u64, hard: u64) -> bool {
    let lim = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads one rlimit from a struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}

#[cfg(not(unix))]
fn get_nofile() -> Option<(u64, u64)> {
    None
}

#[cfg(not(unix))]
fn set_nofile(_soft: u64, _hard: u64) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_open_file_limit() {
        assert_eq!(sized_limits(1024), (896, 10_000));
        assert_eq!(sized_limits(65_536), (64_512, 32_256));
        assert_eq!(sized_limits(1_048_576), (1_047_552, 523_776));
        assert_eq!(sized_limits(0), (1, 10_000));
    }

    #[test]
    fn raising_never_lowers() {
        let now = open_file_limit();
        let after = raise_open_file_limit(Some(1));
        assert_eq!(after.soft, now.soft);
        assert!(after.hard >= now.hard);
    }
}
