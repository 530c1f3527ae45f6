//! Test helper for the spool's process-level tests (crash, disk full, permissions); not a tool.
//!
//! * `append DIR ROUND MAX_PAYLOAD`: append numbered records forever, printing `ID ROUND N LEN`
//!   after each `append` returns, until killed.
//! * `fill DIR LIMIT`: cap this process's file size at LIMIT bytes (RLIMIT_FSIZE), append 10 kB
//!   records until one fails, then append a small one; prints `ok ID`, `err DISKFULL MESSAGE`.
//! * `open DIR`: drop root privileges if any, open the spool, print `ok` or `err MESSAGE`.

use std::io::Write;
use std::process::ExitCode;

use spool::{Spool, SpoolOptions, SyncPolicy};

/// The payload of record `n` of `round`: a self-describing prefix `ROUND:N:LEN:`, then a
/// pattern up to `len` bytes (never shorter than the prefix).
fn payload(round: u64, n: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{round}:{n}:{len}:").into_bytes();
    // Byte i is (31 i ^ 7 n ^ round) mod 256, which repeats every 256 bytes: copy whole blocks.
    let block: Vec<u8> = (0..256u64)
        .map(|i| (i.wrapping_mul(31) ^ n.wrapping_mul(7) ^ round) as u8)
        .collect();
    while p.len() < len {
        let at = p.len() % 256;
        let take = (256 - at).min(len - p.len());
        p.extend_from_slice(&block[at..at + take]);
    }
    p
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("append") if args.len() == 4 => append(&args[1], &args[2], &args[3]),
        Some("fill") if args.len() == 3 => fill(&args[1], &args[2]),
        Some("open") if args.len() == 2 => open(&args[1]),
        _ => Err(
            "usage: spool-crash-helper append DIR ROUND MAX_PAYLOAD | fill DIR LIMIT | open DIR"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spool-crash-helper: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn append(dir: &str, round: &str, max_payload: &str) -> Res {
    let round: u64 = round.parse()?;
    let max_payload: usize = max_payload.parse()?;
    let opts = SpoolOptions {
        segment_bytes: 256 << 10,
        ..SpoolOptions::default()
    };
    let (spool, report) = Spool::open(dir, opts)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "open {} {} {}",
        report.records, report.truncated_bytes, report.corrupt_records
    )?;
    out.flush()?;
    // xorshift: sizes vary from tiny to MAX_PAYLOAD so some writes are large enough to be torn.
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ round;
    for n in 0u64.. {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = if x & 63 == 0 {
            (x >> 8) as usize % max_payload
        } else {
            (x >> 8) as usize % 2048
        };
        let len = len.max(32);
        let id = spool.append(&payload(round, n, len))?;
        writeln!(out, "{id} {round} {n} {len}")?;
        out.flush()?;
    }
    Ok(())
}

fn fill(dir: &str, limit: &str) -> Res {
    let limit: u64 = limit.parse()?;
    // SAFETY: plain libc calls on this process's own limits and signal disposition.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let opts = SpoolOptions {
        segment_bytes: 64 << 20,
        sync: SyncPolicy::Never,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir, opts)?;
    let mut n = 0;
    loop {
        match spool.append(&payload(0, n, 10_000)) {
            Ok(id) => println!("ok {id}"),
            Err(e) => {
                println!("err {} {e}", e.is_disk_full());
                break;
            }
        }
        n += 1;
    }
    let id = spool.append(&payload(0, n + 1, 100))?;
    println!("ok {id}");
    Ok(())
}

fn open(dir: &str) -> Res {
    // SAFETY: plain libc calls; dropping root makes directory permissions apply to this process.
    unsafe {
        if libc::geteuid() == 0 && (libc::setgid(65534) != 0 || libc::setuid(65534) != 0) {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    match Spool::open(dir, SpoolOptions::default()) {
        Ok(_) => println!("ok"),
        Err(e) => println!("err {e}"),
    }
    Ok(())
}
