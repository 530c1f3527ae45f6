//! Behaviour tests of the spool on real files: round trip, recovery, cap, acks, errors.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spool::{Record, Spool, SpoolError, SpoolOptions, SyncPolicy};

fn opts(segment_bytes: u64, max_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        max_bytes,
        segment_bytes,
        max_record_bytes: 64 << 10,
        sync: SyncPolicy::Never,
    }
}

fn rec(n: u64) -> Vec<u8> {
    format!("{{\"type\":\"stream_heartbeat\",\"n\":{n}}}").into_bytes()
}

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn all(s: &Spool) -> Vec<Record> {
    s.read_batch(usize::MAX, usize::MAX).unwrap()
}

#[test]
fn append_read_ack_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(report.records, 0);
    assert!(s.is_empty());
    for n in 0..10 {
        assert_eq!(s.append(&rec(n)).unwrap(), n);
    }
    assert_eq!(s.len(), 10);
    let batch = s.read_batch(500, 1_000_000).unwrap();
    assert_eq!(batch.len(), 10);
    for (n, r) in batch.iter().enumerate() {
        assert_eq!(r.id, n as u64);
        assert_eq!(r.payload, rec(n as u64));
    }
    assert_eq!(
        s.read_batch(500, 1_000_000).unwrap(),
        batch,
        "reading does not consume"
    );
    s.ack(4).unwrap();
    assert_eq!(s.len(), 5);
    assert_eq!(
        s.read_batch(2, 1_000_000)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        vec![5, 6]
    );
    s.ack(2).unwrap(); // behind the cursor: no-op
    assert_eq!(s.len(), 5);
    s.ack(u64::MAX).unwrap(); // past the end: clamped
    assert!(s.is_empty());
    assert_eq!(
        s.bytes(),
        0,
        "a fully acknowledged spool gives its space back"
    );
    assert_eq!(s.append(b"after").unwrap(), 10);
}

#[test]
fn read_batch_respects_limits_but_always_returns_an_oversized_first_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    s.append(&[b'a'; 5000]).unwrap();
    s.append(&[b'b'; 100]).unwrap();
    s.append(&[b'c'; 100]).unwrap();
    let b = s.read_batch(500, 1000).unwrap();
    assert_eq!(b.len(), 1, "the 5000-byte record comes alone");
    assert_eq!(b[0].payload.len(), 5000);
    s.ack(0).unwrap();
    assert_eq!(s.read_batch(500, 150).unwrap().len(), 1);
    assert_eq!(s.read_batch(500, 200).unwrap().len(), 2);
    assert_eq!(s.read_batch(1, 1_000_000).unwrap().len(), 1);
    assert!(s.read_batch(0, 1_000_000).unwrap().is_empty());
}

#[test]
fn ids_stay_monotonic_across_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
        for n in 0..20 {
            s.append(&rec(n)).unwrap();
        }
        s.ack(19).unwrap();
    }
    {
        let (s, report) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
        assert_eq!(report.records, 0);
        assert_eq!(s.append(b"x").unwrap(), 20, "ids continue after a full ack");
        s.append(b"y").unwrap();
        s.ack(20).unwrap();
    }
    let (s, report) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
    assert_eq!(report.records, 1);
    assert_eq!(
        all(&s),
        vec![Record {
            id: 21,
            payload: b"y".to_vec()
        }]
    );
    assert_eq!(s.append(b"z").unwrap(), 22);
}

#[test]
fn ack_deletes_fully_acknowledged_segment_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(tmp.path(), opts(256, 1 << 20)).unwrap();
    for n in 0..100 {
        s.append(&rec(n)).unwrap();
    }
    let files = log_files(tmp.path());
    assert!(files.len() > 5, "small segments roll: {}", files.len());
    let batch = s.read_batch(50, 1_000_000).unwrap();
    s.ack(batch.last().unwrap().id).unwrap();
    let after = log_files(tmp.path());
    assert!(after.len() < files.len());
    // Every remaining file but the first holds only unacknowledged records.
    let first_kept: u64 = after[0]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first_kept <= 50);
    assert_eq!(all(&s).first().unwrap().id, 50);
    s.ack(99).unwrap();
    let left = log_files(tmp.path());
    assert_eq!(left.len(), 1, "only the empty active segment stays");
    assert_eq!(fs::metadata(&left[0]).unwrap().len(), 0);
    assert!(left[0].ends_with("00000000000000000100.log"));
}

fn framed(n: u64) -> u64 {
    8 + rec(n).len() as u64
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
        for n in 0..3 {
            s.append(&rec(n)).unwrap();
        }
    }
    let seg = &log_files(tmp.path())[0];
    let full = fs::metadata(seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(full - 5)
        .unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.truncated_bytes, framed(2) - 5);
    assert_eq!(report.corrupt_records, 1);
    assert_eq!(
        fs::metadata(seg).unwrap().len(),
        framed(0) + framed(1),
        "the file itself is cut"
    );
    let got = all(&s);
    assert_eq!(
        got.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
        vec![rec(0), rec(1)]
    );
    assert_eq!(
        s.append(b"next").unwrap(),
        2,
        "the torn record's id was never acknowledged"
    );
    assert_eq!(all(&s).last().unwrap().payload, b"next");

    // A short header alone is cut too.
    drop(s);
    let len = fs::metadata(seg).unwrap().len();
    OpenOptions::new()
        .append(true)
        .open(seg)
        .unwrap()
        .set_len(len + 3)
        .unwrap();
    let (_s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(report.truncated_bytes, 3);
    assert_eq!(report.records, 3);
}

#[test]
fn bad_crc_cuts_the_segment_at_the_last_good_record() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
        for n in 0..5 {
            s.append(&rec(n)).unwrap();
        }
    }
    let seg = &log_files(tmp.path())[0];
    let mut bytes = fs::read(seg).unwrap();
    let at = (framed(0) + framed(1) + 8 + 3) as usize; // inside record 2's payload
    bytes[at] ^= 0x40;
    fs::write(seg, &bytes).unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(
        report.records, 2,
        "records after the corrupt one in the same segment go with it"
    );
    assert_eq!(report.truncated_bytes, framed(2) + framed(3) + framed(4));
    let got = all(&s);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.payload == rec(r.id)), "never garbage");
}

#[test]
fn zero_filled_tail_from_a_power_loss_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
        s.append(&rec(0)).unwrap();
    }
    let seg = &log_files(tmp.path())[0];
    let len = fs::metadata(seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(report.truncated_bytes, 4096);
    assert_eq!(all(&s).len(), 1);
}

#[test]
fn corruption_in_an_older_segment_keeps_later_segments_and_counts_the_gap() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
        for n in 0..30 {
            s.append(&rec(n)).unwrap();
        }
    }
    let files = log_files(tmp.path());
    let second_first: u64 = files[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(&files[0]).unwrap();
    bytes[(framed(0) + 1) as usize] ^= 0xff; // record 1's length field
    fs::write(&files[0], &bytes).unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
    assert_eq!(
        report.corrupt_records,
        second_first - 1,
        "records 1.. of the first segment"
    );
    let ids: Vec<u64> = all(&s).iter().map(|r| r.id).collect();
    let expected: Vec<u64> = std::iter::once(0).chain(second_first..30).collect();
    assert_eq!(ids, expected);
}

#[test]
fn corruption_found_while_running_is_cut_and_counted_as_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
    for n in 0..30 {
        s.append(&rec(n)).unwrap();
    }
    let files = log_files(tmp.path());
    let second_first: u64 = files[1]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(&files[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01; // the first segment's last record
    fs::write(&files[0], &bytes).unwrap();
    let ids: Vec<u64> = all(&s).iter().map(|r| r.id).collect();
    let expected: Vec<u64> = (0..second_first - 1).chain(second_first..30).collect();
    assert_eq!(ids, expected);
    assert_eq!(s.take_dropped(), 1);
    assert_eq!(s.len(), 29);
    // Corruption in the active segment's first record: it and the rest of the segment are
    // dropped, and later appends go to a fresh segment so ids stay contiguous per file.
    let active = log_files(tmp.path()).pop().unwrap();
    let active_first: u64 = active
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = fs::read(&active).unwrap();
    bytes[9] ^= 0x01;
    fs::write(&active, &bytes).unwrap();
    let ids: Vec<u64> = all(&s).iter().map(|r| r.id).collect();
    let expected: Vec<u64> = (0..second_first - 1)
        .chain(second_first..active_first)
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(s.take_dropped(), 30 - active_first);
    assert_eq!(s.append(b"fresh").unwrap(), 30);
    assert_eq!(
        all(&s).last().unwrap(),
        &Record {
            id: 30,
            payload: b"fresh".to_vec()
        }
    );
    let len = s.len();
    drop(s);
    let (s, report) = Spool::open(tmp.path(), opts(200, 1 << 20)).unwrap();
    assert_eq!(
        report.truncated_bytes, 0,
        "the runtime cut was already applied to the files"
    );
    assert_eq!(s.len(), len);
}

#[test]
fn cap_drops_the_oldest_segments_and_counts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(tmp.path(), opts(512, 2048)).unwrap();
    for n in 0..200 {
        s.append(&rec(n)).unwrap();
        assert!(s.bytes() <= 2048);
    }
    let dropped = s.dropped_records();
    assert!(dropped > 100, "dropped {dropped}");
    assert_eq!(
        s.len() + dropped,
        200,
        "every record is either kept or counted as dropped"
    );
    let ids: Vec<u64> = all(&s).iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        (dropped..200).collect::<Vec<_>>(),
        "the newest survive, in order"
    );
    assert_eq!(s.take_dropped(), dropped);
    assert_eq!(s.take_dropped(), 0, "take_dropped resets");
    assert_eq!(s.dropped_records(), dropped, "the total does not");
    // Acknowledged records in a dropped segment are not counted.
    s.ack(199).unwrap();
    for n in 0..200 {
        s.append(&rec(n)).unwrap();
    }
    assert_eq!(s.take_dropped() + s.len(), 200);
}

#[test]
fn records_larger_than_the_limits_are_rejected_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        max_record_bytes: 1000,
        ..opts(1 << 20, 8 << 20)
    };
    let (s, _) = Spool::open(tmp.path(), o).unwrap();
    let err = s.append(&[0u8; 1001]).unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::RecordTooLarge {
                len: 1001,
                max: 1000
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("1001 bytes"), "{err}");
    assert_eq!(s.append(&[0u8; 1000]).unwrap(), 0);
    let (s2, _) = Spool::open(tmp.path().join("small"), opts(64, 100)).unwrap();
    assert!(matches!(
        s2.append(&[0u8; 93]),
        Err(SpoolError::RecordTooLarge { max: 92, .. })
    ));
    assert!(s2.append(&[0u8; 92]).is_ok());
}

#[test]
fn invalid_options_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        Spool::open(tmp.path(), opts(0, 100)),
        Err(SpoolError::InvalidOptions(_))
    ));
    assert!(matches!(
        Spool::open(tmp.path(), opts(10, 8)),
        Err(SpoolError::InvalidOptions(_))
    ));
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    let err = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err:?}");
    assert!(
        err.to_string().contains("SCOPE_METRICS_BUFFER_PATH"),
        "{err}"
    );
}

#[test]
fn a_path_under_a_regular_file_gives_an_error_naming_it_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let err = Spool::open(file.join("buffer"), opts(1 << 20, 8 << 20)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("plain-file"), "{msg}");
    assert!(msg.contains("SCOPE_METRICS_BUFFER_PATH"), "{msg}");
}

#[test]
fn a_garbage_ack_file_redelivers_instead_of_losing() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
        for n in 0..4 {
            s.append(&rec(n)).unwrap();
        }
        s.ack(1).unwrap();
    }
    fs::write(tmp.path().join("ack"), b"garbage").unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert!(report.ack_file_invalid);
    assert_eq!(s.len(), 4);
}

#[test]
fn an_ack_durable_beyond_the_recovered_tail_never_reuses_acknowledged_ids() {
    // Group commit: the ack file was fsynced but the segment's tail was not, and the power went.
    let tmp = tempfile::tempdir().unwrap();
    {
        let (s, _) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
        for n in 0..5 {
            s.append(&rec(n)).unwrap();
        }
        s.ack(3).unwrap();
    }
    let seg = &log_files(tmp.path())[0];
    OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(framed(0) + framed(1))
        .unwrap();
    let (s, report) = Spool::open(tmp.path(), opts(1 << 20, 8 << 20)).unwrap();
    assert_eq!(report.records, 0);
    assert_eq!(
        s.append(b"new").unwrap(),
        4,
        "ids 0..=3 were acknowledged and are never handed out again"
    );
    assert_eq!(
        all(&s),
        vec![Record {
            id: 4,
            payload: b"new".to_vec()
        }]
    );
}

#[test]
fn sync_forces_a_commit_without_waiting_for_the_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        sync: SyncPolicy::Group {
            interval: Duration::from_secs(3600),
            max_unsynced_bytes: u64::MAX,
        },
        ..opts(1 << 20, 8 << 20)
    };
    let (s, _) = Spool::open(tmp.path(), o).unwrap();
    for _ in 0..3 {
        s.append(b"x").unwrap();
    }
    // The background commit is an hour away: the three records are written, not yet fsynced.
    assert_eq!(s.unsynced_records(), 3, "nothing committed before sync()");
    let t = std::time::Instant::now();
    s.sync().unwrap();
    assert_eq!(s.unsynced_records(), 0, "sync() committed every record");
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn group_commit_fsyncs_in_the_background_and_never_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let group = SpoolOptions {
        sync: SyncPolicy::Group {
            interval: Duration::from_millis(2),
            max_unsynced_bytes: 1 << 20,
        },
        ..opts(4096, 1 << 20)
    };
    let (s, _) = Spool::open(tmp.path().join("group"), group).unwrap();
    for n in 0..500 {
        s.append(&rec(n)).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.unsynced_records() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the background group commit never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let (s, _) = Spool::open(tmp.path().join("never"), opts(4096, 1 << 20)).unwrap();
    for n in 0..10 {
        s.append(&rec(n)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.unsynced_records(), 10, "Never leaves fsync to the caller");
    s.sync().unwrap();
    assert_eq!(s.unsynced_records(), 0);

    let always = SpoolOptions {
        sync: SyncPolicy::Always,
        ..opts(4096, 1 << 20)
    };
    let (s, _) = Spool::open(tmp.path().join("always"), always).unwrap();
    s.append(b"x").unwrap();
    assert_eq!(
        s.unsynced_records(),
        0,
        "Always returns only after the fsync"
    );
}

#[test]
fn concurrent_appenders_and_a_reader_lose_and_duplicate_nothing() {
    for sync in [
        SyncPolicy::default(),
        SyncPolicy::Always,
        SyncPolicy::Group {
            interval: Duration::ZERO,
            max_unsynced_bytes: 0,
        },
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let per_thread = if sync == SyncPolicy::Always { 25 } else { 500 };
        let (s, _) = Spool::open(
            tmp.path(),
            SpoolOptions {
                sync,
                ..opts(4096, 64 << 20)
            },
        )
        .unwrap();
        let s = Arc::new(s);
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for n in 0..per_thread {
                        s.append(format!("{t}:{n}").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        let total = 4 * per_thread;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < total as usize && std::time::Instant::now() < deadline {
            let batch = s.read_batch(37, 1_000_000).unwrap();
            if let Some(last) = batch.last() {
                s.ack(last.id).unwrap();
            }
            seen.extend(batch);
        }
        for w in writers {
            w.join().unwrap();
        }
        seen.extend(all(&s));
        assert_eq!(seen.len() as u64, total, "{sync:?}");
        assert!(
            seen.windows(2).all(|w| w[0].id + 1 == w[1].id),
            "ids contiguous and ordered"
        );
        let mut payloads: Vec<_> = seen.iter().map(|r| r.payload.clone()).collect();
        payloads.sort();
        payloads.dedup();
        assert_eq!(payloads.len() as u64, total, "no duplicates");
        for t in 0..4 {
            let mine: Vec<u64> = seen
                .iter()
                .filter_map(|r| {
                    let p = String::from_utf8(r.payload.clone()).unwrap();
                    let (a, b) = p.split_once(':').unwrap();
                    (a.parse::<u64>().unwrap() == t).then(|| b.parse().unwrap())
                })
                .collect();
            assert_eq!(
                mine,
                (0..per_thread).collect::<Vec<_>>(),
                "per-thread order kept"
            );
        }
    }
}

#[test]
fn ack_counts_only_the_records_it_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, _) = Spool::open(tmp.path(), opts(512, 2048)).unwrap();
    for n in 0..10 {
        s.append(&rec(n)).unwrap();
    }
    assert_eq!(s.ack(3).unwrap(), 4);
    assert_eq!(s.ack(2).unwrap(), 0, "behind the cursor");
    assert_eq!(s.ack(5).unwrap(), 2, "only the new ones");
    // The cap deletes the oldest segments; an ack covering them counts only what was left.
    for n in 10..200 {
        s.append(&rec(n)).unwrap();
    }
    let dropped = s.dropped_records();
    assert!(dropped > 0);
    let left = s.len();
    assert_eq!(
        s.ack(199).unwrap(),
        left,
        "records the cap took are not counted again"
    );
    assert_eq!(s.ack(u64::MAX).unwrap(), 0);
}
