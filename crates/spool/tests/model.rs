//! Property test: the spool against an in-memory model of the same policy (segments, cap,
//! acks, reopen, and crash damage to segment files), compared after every operation.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use spool::{Record, RecoveryReport, Spool, SpoolError, SpoolOptions, SyncPolicy};

const HEADER: u64 = 8;

#[derive(Debug, Clone)]
enum Op {
    /// Append a payload of this length filled from this seed.
    Append(usize, u8),
    /// `read_batch(max_records, max_bytes)`.
    Read(usize, usize),
    /// Ack up to the first unacknowledged id + k - 1 (k = 0: one below it, a no-op).
    Ack(u64),
    /// Ack far past the end (clamped to everything appended).
    AckAll,
    /// Close and open again.
    Reopen,
    /// Crash: truncate the last segment file to `per_mille` of its size, then open.
    TruncateLast(u16),
    /// Crash: XOR one byte of a segment file (picked by the two numbers), then open.
    Flip(u16, u16, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..300, any::<u8>()).prop_map(|(l, s)| Op::Append(l, s)),
        1 => (400usize..600, any::<u8>()).prop_map(|(l, s)| Op::Append(l, s)),
        3 => (0usize..12, 0usize..1500).prop_map(|(r, b)| Op::Read(r, b)),
        3 => (0u64..10).prop_map(Op::Ack),
        1 => Just(Op::AckAll),
        1 => Just(Op::Reopen),
        1 => (0u16..=1000).prop_map(Op::TruncateLast),
        1 => (any::<u16>(), any::<u16>(), 1u8..=255).prop_map(|(s, p, x)| Op::Flip(s, p, x)),
    ]
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ seed)
        .collect()
}

#[derive(Debug, Clone)]
struct MSeg {
    first: u64,
    recs: Vec<(u64, Vec<u8>)>,
}

impl MSeg {
    fn end(&self) -> u64 {
        self.first + self.recs.len() as u64
    }
    fn size(&self) -> u64 {
        self.recs.iter().map(|(_, p)| HEADER + p.len() as u64).sum()
    }
}

/// The reference: the same policy, on plain vectors.
struct Model {
    opts: SpoolOptions,
    segs: Vec<MSeg>,
    next_id: u64,
    ack_next: u64,
    dropped: u64,
}

impl Model {
    fn new(opts: SpoolOptions) -> Self {
        Model {
            opts,
            segs: vec![MSeg {
                first: 0,
                recs: vec![],
            }],
            next_id: 0,
            ack_next: 0,
            dropped: 0,
        }
    }

    fn max_payload(&self) -> u64 {
        (self.opts.max_record_bytes as u64).min(self.opts.max_bytes - HEADER)
    }

    fn total(&self) -> u64 {
        self.segs.iter().map(MSeg::size).sum()
    }

    fn roll(&mut self) {
        self.segs.push(MSeg {
            first: self.next_id,
            recs: vec![],
        });
    }

    fn unacked_in(&self, s: &MSeg) -> u64 {
        s.end() - s.first.max(self.ack_next).min(s.end())
    }

    fn append(&mut self, p: Vec<u8>) -> Option<u64> {
        if p.len() as u64 > self.max_payload() {
            return None;
        }
        let framed = HEADER + p.len() as u64;
        let active = self.segs.last().unwrap().size();
        if active > 0 && active + framed > self.opts.segment_bytes {
            self.roll();
        }
        while self.total() + framed > self.opts.max_bytes {
            if self.segs.len() == 1 {
                self.roll();
            }
            let s = self.segs.remove(0);
            self.dropped += self.unacked_in(&s);
        }
        let id = self.next_id;
        self.segs.last_mut().unwrap().recs.push((id, p));
        self.next_id += 1;
        Some(id)
    }

    fn unacked(&self) -> Vec<Record> {
        let mut out = vec![];
        for s in &self.segs {
            for (id, p) in &s.recs {
                if *id >= self.ack_next {
                    out.push(Record {
                        id: *id,
                        payload: p.clone(),
                    });
                }
            }
        }
        out
    }

    fn read(&self, max_records: usize, max_bytes: usize) -> Vec<Record> {
        let mut out = vec![];
        let mut bytes = 0;
        for r in self.unacked() {
            if out.len() >= max_records || (!out.is_empty() && bytes + r.payload.len() > max_bytes)
            {
                break;
            }
            bytes += r.payload.len();
            out.push(r);
        }
        out
    }

    fn ack(&mut self, up_to: u64) {
        let n = up_to.saturating_add(1).min(self.next_id);
        if n <= self.ack_next {
            return;
        }
        self.ack_next = n;
        while self.segs.len() > 1 && self.segs[0].end() <= self.ack_next {
            self.segs.remove(0);
        }
        if self.segs.len() == 1 && self.segs[0].end() <= self.ack_next && self.segs[0].size() > 0 {
            self.roll();
            self.segs.remove(0);
        }
    }

    /// Cuts segment `i` so only records ending at or before byte `keep` survive; returns the
    /// (truncated bytes, corrupt records) recovery must report for a file of `file_len` bytes.
    fn cut(&mut self, i: usize, keep: u64, file_len: u64) -> (u64, u64) {
        let mut off = 0;
        let mut n = 0;
        for (_, p) in &self.segs[i].recs {
            let end = off + HEADER + p.len() as u64;
            if end > keep {
                break;
            }
            off = end;
            n += 1;
        }
        self.segs[i].recs.truncate(n);
        if off == file_len {
            return (0, 0);
        }
        let lost = match self.segs.get(i + 1) {
            Some(next) => (next.first - self.segs[i].end()).max(1),
            None => 1,
        };
        (file_len - off, lost)
    }

    /// What `Spool::open` does with the segments left on disk.
    fn reopen(&mut self, truncated_bytes: u64, corrupt_records: u64) -> RecoveryReport {
        self.dropped = 0;
        let next = self
            .segs
            .iter()
            .map(MSeg::end)
            .fold(self.ack_next, u64::max);
        let last = self.segs.len() - 1;
        let ack = self.ack_next;
        let kept: Vec<MSeg> = std::mem::take(&mut self.segs)
            .into_iter()
            .enumerate()
            .filter(|(i, s)| {
                if s.recs.is_empty() {
                    *i == last && s.first == next
                } else {
                    s.end() > ack
                }
            })
            .map(|(_, s)| s)
            .collect();
        self.segs = kept;
        if self.segs.last().is_none_or(|s| s.end() != next) {
            self.segs.push(MSeg {
                first: next,
                recs: vec![],
            });
        }
        self.next_id = next;
        RecoveryReport {
            segments: self.segs.len(),
            records: self.unacked().len() as u64,
            truncated_bytes,
            corrupt_records,
            ack_file_invalid: false,
        }
    }
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

fn log_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

fn check(spool: &Spool, model: &Model, dir: &Path) -> Result<(), TestCaseError> {
    prop_assert_eq!(spool.len(), model.unacked().len() as u64, "len");
    prop_assert_eq!(spool.bytes(), model.total(), "bytes");
    prop_assert_eq!(spool.dropped_records(), model.dropped, "dropped");
    prop_assert_eq!(
        spool.read_batch(usize::MAX, usize::MAX).unwrap(),
        model.unacked(),
        "contents"
    );
    let expected: Vec<String> = model
        .segs
        .iter()
        .map(|s| format!("{:020}.log", s.first))
        .collect();
    prop_assert_eq!(log_files(dir), expected, "segment files");
    Ok(())
}

fn run(opts: SpoolOptions, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let mut model = Model::new(opts.clone());
    let (s, report) = Spool::open(&dir, opts.clone()).unwrap();
    prop_assert_eq!(report, model.reopen(0, 0));
    let mut spool = Some(s);
    for op in ops {
        let sp = spool.as_ref().unwrap();
        match op {
            Op::Append(len, seed) => {
                let p = payload(len, seed);
                match (sp.append(&p), model.append(p)) {
                    (Ok(a), Some(b)) => prop_assert_eq!(a, b),
                    (Err(SpoolError::RecordTooLarge { .. }), None) => {}
                    (a, b) => prop_assert!(false, "append: spool {a:?}, model {b:?}"),
                }
            }
            Op::Read(r, b) => prop_assert_eq!(sp.read_batch(r, b).unwrap(), model.read(r, b)),
            Op::Ack(k) => {
                let first = model.unacked().first().map_or(model.next_id, |r| r.id);
                if let Some(up_to) = (first + k).checked_sub(1) {
                    sp.ack(up_to).unwrap();
                    model.ack(up_to);
                }
            }
            Op::AckAll => {
                sp.ack(u64::MAX - 1).unwrap();
                model.ack(u64::MAX - 1);
            }
            Op::Reopen | Op::TruncateLast(_) | Op::Flip(..) => {
                drop(spool.take());
                let (mut truncated, mut corrupt) = (0, 0);
                if let Op::TruncateLast(per_mille) = op {
                    let last = model.segs.len() - 1;
                    let size = model.segs[last].size();
                    let keep = size * u64::from(per_mille) / 1000;
                    let path = seg_path(&dir, model.segs[last].first);
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(keep)
                        .unwrap();
                    (truncated, corrupt) = model.cut(last, keep, keep);
                }
                if let Op::Flip(s, p, x) = op {
                    let i = usize::from(s) % model.segs.len();
                    let size = model.segs[i].size();
                    if size > 0 {
                        let at = u64::from(p) % size;
                        let path = seg_path(&dir, model.segs[i].first);
                        let mut bytes = fs::read(&path).unwrap();
                        bytes[at as usize] ^= x;
                        fs::write(&path, bytes).unwrap();
                        (truncated, corrupt) = model.cut(i, at, size);
                    }
                }
                let expected = model.reopen(truncated, corrupt);
                let (s, report) = Spool::open(&dir, opts.clone()).unwrap();
                prop_assert_eq!(report, expected, "recovery report");
                spool = Some(s);
            }
        }
        check(spool.as_ref().unwrap(), &model, &dir)?;
    }
    Ok(())
}

fn options() -> impl Strategy<Value = SpoolOptions> {
    (
        prop_oneof![Just(64u64), Just(300), Just(1200)],
        prop_oneof![Just(400u64), Just(1500), Just(6000)],
    )
        .prop_map(|(segment_bytes, max_bytes)| SpoolOptions {
            max_bytes,
            segment_bytes,
            max_record_bytes: 450,
            sync: SyncPolicy::Never,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_model(opts in options(), ops in prop::collection::vec(op(), 1..70)) {
        run(opts, ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Same model, with real group commit running underneath (fsyncs on a background thread).
    #[test]
    fn spool_matches_model_under_group_commit(ops in prop::collection::vec(op(), 1..40)) {
        let opts = SpoolOptions {
            max_bytes: 1500,
            segment_bytes: 300,
            max_record_bytes: 450,
            sync: SyncPolicy::Group { interval: std::time::Duration::from_millis(1), max_unsynced_bytes: 500 },
        };
        run(opts, ops)?;
    }
}
