//! Process-level tests through the `spool-crash-helper` binary: a real `kill -9` in the middle
//! of appends, a real short write at a file-size limit, and a real permission refusal.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use spool::{Record, Spool, SpoolOptions, SyncPolicy};

const HELPER: &str = env!("CARGO_BIN_EXE_spool-crash-helper");

/// Same generator as the helper: prefix `ROUND:N:LEN:`, then a pattern up to `len` bytes.
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

/// Parses a payload's prefix and checks the rest is exactly what the helper wrote.
fn decode(r: &Record) -> (u64, u64) {
    let text = String::from_utf8_lossy(&r.payload[..r.payload.len().min(40)]).into_owned();
    let mut parts = text.splitn(4, ':');
    let mut next = || parts.next().and_then(|s| s.parse::<u64>().ok());
    let (round, n, len) = match (next(), next(), next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => panic!("record {} is garbage: {text:?}", r.id),
    };
    assert_eq!(
        r.payload,
        payload(round, n, len as usize),
        "record {} is damaged",
        r.id
    );
    (round, n)
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    t.as_nanos() as u64 | 1
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn read_options() -> SpoolOptions {
    SpoolOptions {
        sync: SyncPolicy::Never,
        ..SpoolOptions::default()
    }
}

#[test]
fn kill_9_during_appends_loses_no_reported_record_and_leaves_no_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let mut rng = seed();
    eprintln!("seed {rng}");
    // (id, round, n) of every record the child reported after `append` returned.
    let mut reported: Vec<(u64, u64, u64)> = Vec::new();
    let mut truncated_total = 0;
    for round in 0..5u64 {
        let mut child = Command::new(HELPER)
            .args(["append", dir.to_str().unwrap(), &round.to_string(), "65536"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("helper did not start");
        let fields: Vec<u64> = first
            .split(' ')
            .skip(1)
            .map(|f| f.parse().unwrap())
            .collect();
        truncated_total += fields[1];
        // Let it run a random while, then kill -9 in the middle of whatever it is doing.
        std::thread::sleep(Duration::from_millis(10 + next(&mut rng) % 90));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "the helper was killed");
        reader.join().unwrap();
        let before = reported.len();
        for line in rx.try_iter() {
            let f: Vec<u64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            assert_eq!(f[1], round);
            reported.push((f[0], f[1], f[2]));
        }
        assert!(
            reported.len() > before,
            "round {round}: the helper appended nothing before the kill"
        );

        let (spool, report) = Spool::open(&dir, read_options()).unwrap();
        let records = spool.read_batch(usize::MAX, usize::MAX).unwrap();
        drop(spool);
        assert!(
            records.windows(2).all(|w| w[0].id < w[1].id),
            "ids strictly increase"
        );
        let decoded: Vec<(u64, u64, u64)> = records
            .iter()
            .map(|r| {
                let (ro, n) = decode(r);
                (r.id, ro, n)
            })
            .collect();
        // Everything reported is there, in order; anything else is the one record per round
        // whose append completed but whose line the kill cut off, right after that round.
        let mut it = decoded.iter();
        let mut extra = 0;
        for want in &reported {
            for got in it.by_ref() {
                if got == want {
                    break;
                }
                assert!(
                    got.1 < want.1,
                    "unreported record {got:?} before reported {want:?}"
                );
                extra += 1;
            }
        }
        extra += it.count();
        assert!(
            extra <= round as usize + 1,
            "too many unreported records: {extra}"
        );
        let present: std::collections::HashSet<_> = decoded.iter().collect();
        for want in &reported {
            assert!(
                present.contains(want),
                "round {round}: reported record {want:?} is missing ({report:?})"
            );
        }
    }
    eprintln!(
        "{} records reported across 5 kills; {truncated_total} torn bytes cut on reopen",
        reported.len()
    );
}

#[test]
fn a_short_write_at_the_file_size_limit_is_an_error_and_the_log_stays_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let framed = 10_008u64;
    let limit = 5 * framed + 5000; // the sixth record is written halfway, then EFBIG
    let out = Command::new(HELPER)
        .args(["fill", dir.to_str().unwrap(), &limit.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        &lines[..5],
        &["ok 0", "ok 1", "ok 2", "ok 3", "ok 4"],
        "{stdout}"
    );
    assert!(
        lines[5].starts_with("err true no space left"),
        "disk-full error expected: {}",
        lines[5]
    );
    assert!(lines[5].contains("NOT stored"), "{}", lines[5]);
    assert_eq!(
        lines[6], "ok 5",
        "a record that fits still goes in after the failure"
    );

    let (spool, report) = Spool::open(&dir, read_options()).unwrap();
    assert_eq!(
        report.truncated_bytes, 0,
        "the short write was cut back before the next append"
    );
    let records = spool.read_batch(usize::MAX, usize::MAX).unwrap();
    assert_eq!(records.len(), 6);
    for (i, r) in records.iter().enumerate().take(5) {
        assert_eq!(r.payload, payload(0, i as u64, 10_000));
    }
    assert_eq!(records[5].payload, payload(0, 6, 100));
    let seg = dir.join("00000000000000000000.log");
    assert_eq!(std::fs::metadata(seg).unwrap().len(), 5 * framed + 108);
}

#[test]
fn an_unwritable_directory_gives_the_error_that_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ro = tmp.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    for dir in [ro.clone(), ro.join("buffer")] {
        let out = Command::new(HELPER)
            .args(["open", dir.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helper failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected = format!(
            "err cannot write buffer directory {}: permission denied",
            dir.display()
        );
        assert!(stdout.starts_with(&expected), "{stdout}");
        assert!(
            stdout.contains("set SCOPE_METRICS_BUFFER_PATH to a writable directory"),
            "{stdout}"
        );
    }
    assert!(!Path::new(&ro.join("buffer")).exists());
}
