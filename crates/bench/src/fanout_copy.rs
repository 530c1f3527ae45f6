//! `trickle-relay bench fanout-copy`: the kernel's copy path for fan-out, `writev` from user
//! memory against `sendfile` from a memory file, without the trickle server around it.
//!
//! Issue #17 asked whether the server's last per-subscriber copy (the kernel copying each
//! subscriber's bytes into its socket, `_copy_from_iter` in a profile of `bench fanout`) is worth
//! removing with `sendfile` from a `memfd`, which lets the socket reference the file's pages
//! instead of copying them. This bench answers that before any server code changes: one segment
//! (`--bytes`, held both as `--chunk-bytes` pieces in user memory, as the server holds it, and in
//! a `memfd`) goes to `--subscribers` loopback TCP sockets, once per mode and run:
//!
//! - `write`: what the server does now, one vectored write of up to 64 pieces per call;
//! - `sendfile`: `sendfile(2)` from the memfd, up to the same 4 MiB per call.
//!
//! Like the server, ONE sender thread serves every socket, non-blocking, woken by `poll(2)`;
//! each subscriber is a thread reading into a 256 KiB buffer. Before the timed runs, one
//! untimed pass per mode, with a small send buffer (so that writes come back short, mid-piece),
//! checks every byte a subscriber receives.
//!
//! The figure to read is the process's CPU per GB delivered (sender and subscribers together).
//! The sender thread's own CPU is printed too, but on loopback it is not the sender's cost: a
//! subscriber's ACK, processed inside its `recv`, transmits the sender's queued data (and its
//! receive processing) from the subscriber's thread, and how much of the work moves that way
//! depends on the mode. Only a real NIC, with subscribers on other machines, separates them.
//!
//! `--plot` draws the duration of each send call (per mode) and the bytes all subscribers
//! received over time (per mode and run).

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, Spread, ThroughputSeries, Timeline,
};
use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::json;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// Most pieces in one vectored write (as the server's `MAX_BATCH`).
const MAX_BATCH: usize = 64;
/// Most bytes asked of one `sendfile` call.
const MAX_SENDFILE: usize = 4 * 1024 * 1024;
/// A subscriber's read buffer.
const READ_BUF: usize = 256 * 1024;
/// The sender gives up when no socket becomes writable for this long.
const STALL: Duration = Duration::from_secs(30);

/// How the sender puts the segment's bytes into a socket.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Vectored write from the pieces in user memory (the kernel copies them into the socket).
    Write,
    /// `sendfile` from the memfd (the socket references the file's pages).
    Sendfile,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Write => "write",
            Mode::Sendfile => "sendfile",
        }
    }
}

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the segment, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub bytes: usize,
    /// Size of each piece of the segment in user memory, in bytes (the publisher's writes).
    #[arg(long, default_value_t = 64 * 1024)]
    pub chunk_bytes: usize,
    /// Subscribers (loopback TCP sockets) each receiving the whole segment.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Runs of each mode (alternating; median and spread are reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// The modes to compare, in run order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "write,sendfile"
    )]
    pub modes: Vec<Mode>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The segment, as the server holds it and as a memory file.
struct Segment {
    pieces: Vec<Bytes>,
    memfd: File,
    len: usize,
    piece_len: usize,
}

/// One timed run of one mode.
struct Run {
    secs: f64,
    delivered: u64,
    /// CPU of the whole process over the run (sender and subscribers).
    cpu_secs: f64,
    /// CPU of the sender thread alone (see the module docs for why this misleads on loopback).
    sender_cpu_secs: f64,
    calls: u64,
    timeline: Timeline,
}

/// Runs this benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.subscribers > 0 && args.repeat > 0 && args.chunk_bytes > 0 && args.bytes > 0,
        "--subscribers, --repeat, --chunk-bytes and --bytes must be at least 1"
    );
    ensure!(!args.modes.is_empty(), "--modes names no mode");
    args.common.check()?;
    let bar = report::progress((args.repeat * args.modes.len()) as u64, "fanout-copy");
    let (args, results) = tokio::task::spawn_blocking(move || {
        let r = measure(&args, &bar);
        bar.finish_and_clear();
        r.map(|r| (args, r))
    })
    .await
    .context("the fanout-copy thread failed")??;
    report(&args, &results)
}

/// Byte `i` of the segment: varies within and across pages, so a wrong offset shows.
fn pattern(i: usize) -> u8 {
    (i ^ (i >> 12).wrapping_mul(131)) as u8
}

fn build_segment(args: &Args) -> anyhow::Result<Segment> {
    let pieces: Vec<Bytes> = (0..args.bytes)
        .step_by(args.chunk_bytes)
        .map(|start| {
            let end = (start + args.chunk_bytes).min(args.bytes);
            Bytes::from((start..end).map(pattern).collect::<Vec<u8>>())
        })
        .collect();
    // SAFETY: a valid NUL-terminated name and flags; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"trickle-fanout-copy".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let mut memfd = unsafe { File::from_raw_fd(fd) };
    for p in &pieces {
        memfd
            .write_all(p)
            .context("writing the segment into the memfd")?;
    }
    Ok(Segment {
        pieces,
        memfd,
        len: args.bytes,
        piece_len: args.chunk_bytes,
    })
}

/// One mode's timed runs and the durations of its send calls.
struct Measured {
    mode: Mode,
    runs: Vec<Run>,
    calls: Histogram<u64>,
}

/// Every mode's runs and its send-call durations, in `args.modes` order.
fn measure(args: &Args, bar: &indicatif::ProgressBar) -> anyhow::Result<Vec<Measured>> {
    let seg = build_segment(args)?;
    let mut results: Vec<Measured> = args
        .modes
        .iter()
        .map(|&mode| Measured {
            mode,
            runs: Vec::new(),
            calls: report::histogram(),
        })
        .collect();
    // Untimed: every byte checked, and the memfd's pages and the allocator warmed for both.
    for &mode in &args.modes {
        let mut hist = report::histogram();
        one_run(&seg, mode, 1, true, &mut hist)
            .with_context(|| format!("checking the {} path", mode.name()))?;
    }
    for _ in 0..args.repeat {
        for m in &mut results {
            let run = one_run(&seg, m.mode, args.subscribers, false, &mut m.calls)
                .with_context(|| format!("a {} run", m.mode.name()))?;
            m.runs.push(run);
            bar.inc(1);
        }
    }
    Ok(results)
}

/// One subscriber: reads to EOF, counting (and with `check`, comparing) every byte.
fn subscriber(mut sock: TcpStream, origin: Instant, check: bool) -> io::Result<(u64, Timeline)> {
    let mut buf = vec![0u8; READ_BUF];
    let mut got = 0usize;
    let mut timeline = Timeline::new(origin);
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        timeline.record(Instant::now(), n as u64);
        if check {
            if let Some(k) = (0..n).find(|&k| buf[k] != pattern(got + k)) {
                let msg = format!("byte {} differs from the segment", got + k);
                return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
            }
        }
        got += n;
    }
    Ok((got as u64, timeline))
}

/// One socket's progress through the segment.
struct Out {
    sock: TcpStream,
    off: usize,
}

fn one_run(
    seg: &Segment,
    mode: Mode,
    subscribers: usize,
    check: bool,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<Run> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a loopback listener")?;
    let addr = listener.local_addr()?;
    let spawned = Instant::now();
    let mut readers = Vec::with_capacity(subscribers);
    let mut outs = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let sock = TcpStream::connect(addr).context("connect a subscriber")?;
        readers.push(std::thread::spawn(move || subscriber(sock, spawned, check)));
        let (sock, _) = listener.accept().context("accept a subscriber")?;
        sock.set_nonblocking(true)?;
        if check {
            small_send_buffer(&sock)?;
        }
        outs.push(Out { sock, off: 0 });
    }

    let cpu_start = process_cpu()?;
    let sender_start = thread_cpu()?;
    let start = Instant::now();
    let sent = send_all(seg, mode, &mut outs, hist);
    // Closing the sockets is what ends the subscribers' reads.
    drop(outs);
    let sender_cpu_secs = thread_cpu()? - sender_start;
    let mut timeline = Timeline::new(start);
    let mut delivered = 0u64;
    let mut received = Vec::with_capacity(readers.len());
    for r in readers {
        let r = r
            .join()
            .map_err(|_| anyhow::anyhow!("a subscriber thread panicked"))?;
        received.push(r.context("a subscriber"));
    }
    // A subscriber's error (wrong bytes) is the cause of the sender's (connection reset).
    let received: Vec<(u64, Timeline)> = received.into_iter().collect::<anyhow::Result<_>>()?;
    let calls = sent?;
    for (n, t) in received {
        ensure!(
            n == seg.len as u64,
            "a subscriber got {n} bytes, expected {}",
            seg.len
        );
        delivered += n;
        timeline.merge(&t);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu()? - cpu_start;
    Ok(Run {
        secs,
        delivered,
        cpu_secs,
        sender_cpu_secs,
        calls,
        timeline,
    })
}

/// A send buffer too small for a whole batch, so the checked pass sees short writes that end
/// mid-piece and resume from there. Not smaller than a few loopback segments (64 KiB each): with
/// 24 KiB, a 256 MiB pass once stalled for good, the receiver never taking the unacked segment.
fn small_send_buffer(sock: &TcpStream) -> anyhow::Result<()> {
    let size: libc::c_int = 192 * 1024;
    // SAFETY: a valid socket and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt SO_SNDBUF");
    }
    Ok(())
}

/// The sender: every socket gets the whole segment; returns the number of send calls.
fn send_all(
    seg: &Segment,
    mode: Mode,
    outs: &mut [Out],
    hist: &mut Histogram<u64>,
) -> anyhow::Result<u64> {
    let mut calls = 0u64;
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(outs.len());
    let mut live: Vec<usize> = (0..outs.len()).collect();
    while !live.is_empty() {
        fds.clear();
        fds.extend(live.iter().map(|&i| libc::pollfd {
            fd: outs[i].sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }));
        let timeout = STALL.as_millis() as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        ensure!(rc > 0, "no subscriber socket became writable for {STALL:?}");
        for (k, &i) in live.iter().enumerate() {
            if fds[k].revents == 0 {
                continue;
            }
            let out = &mut outs[i];
            while out.off < seg.len {
                let t = Instant::now();
                let r = match mode {
                    Mode::Write => write_pieces(seg, out),
                    Mode::Sendfile => sendfile(seg, out),
                };
                calls += 1;
                match r {
                    Ok(n) => {
                        report::record(hist, t.elapsed());
                        out.off += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("sending to a subscriber"),
                }
            }
        }
        live.retain(|&i| outs[i].off < seg.len);
    }
    Ok(calls)
}

/// One vectored write of up to [`MAX_BATCH`] pieces from the socket's offset.
fn write_pieces(seg: &Segment, out: &mut Out) -> io::Result<usize> {
    let first = out.off / seg.piece_len;
    let inner = out.off % seg.piece_len;
    let end = (first + MAX_BATCH).min(seg.pieces.len());
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(end - first);
    iov.push(IoSlice::new(&seg.pieces[first][inner..]));
    iov.extend(seg.pieces[first + 1..end].iter().map(|p| IoSlice::new(p)));
    out.sock.write_vectored(&iov)
}

/// One `sendfile` of up to [`MAX_SENDFILE`] bytes from the socket's offset in the memfd.
fn sendfile(seg: &Segment, out: &mut Out) -> io::Result<usize> {
    let mut off = out.off as libc::off_t;
    let want = (seg.len - out.off).min(MAX_SENDFILE);
    // SAFETY: both descriptors are open for the call and `off` is a valid, owned offset.
    let n = unsafe { libc::sendfile(out.sock.as_raw_fd(), seg.memfd.as_raw_fd(), &mut off, want) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "sendfile: the memfd ended early",
        )),
        n => Ok(n as usize),
    }
}

/// CPU time (user + system) of `who` (`RUSAGE_SELF` or `RUSAGE_THREAD`), in seconds.
fn rusage(who: libc::c_int) -> anyhow::Result<f64> {
    // SAFETY: `rusage` is plain data; all-zero is a valid value for the kernel to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Err(io::Error::last_os_error()).context("getrusage");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Ok(secs(ru.ru_utime) + secs(ru.ru_stime))
}

fn process_cpu() -> anyhow::Result<f64> {
    rusage(libc::RUSAGE_SELF)
}

fn thread_cpu() -> anyhow::Result<f64> {
    rusage(libc::RUSAGE_THREAD)
}

/// One mode's figures.
struct Figures {
    rate: Spread,
    cpu_per_gb: Spread,
    sender_cpu_per_gb: Spread,
    bytes_per_call: f64,
}

fn figures(runs: &[Run]) -> Figures {
    let per_gb = |f: fn(&Run) -> f64| {
        Spread::of(
            runs.iter()
                .map(|r| f(r) / (r.delivered as f64 / 1e9))
                .collect(),
        )
    };
    let calls: u64 = runs.iter().map(|r| r.calls).sum();
    let bytes: u64 = runs.iter().map(|r| r.delivered).sum();
    Figures {
        rate: Spread::of(runs.iter().map(|r| r.delivered as f64 / r.secs).collect()),
        cpu_per_gb: per_gb(|r| r.cpu_secs),
        sender_cpu_per_gb: per_gb(|r| r.sender_cpu_secs),
        bytes_per_call: bytes as f64 / calls.max(1) as f64,
    }
}

fn report(args: &Args, results: &[Measured]) -> anyhow::Result<()> {
    let mut recording = Recording::default();
    let mut modes = Vec::new();
    let mut human = Vec::new();
    for (m, measured) in results.iter().enumerate() {
        let (mode, runs, hist) = (&measured.mode, &measured.runs, &measured.calls);
        if runs.is_empty() {
            bail!("no {} run was recorded", mode.name());
        }
        let f = figures(runs);
        recording.latency.push(LatencySeries {
            label: format!("{} call", mode.name()),
            hist: hist.clone(),
        });
        for (i, r) in runs.iter().enumerate() {
            recording.throughput.push(ThroughputSeries {
                label: format!("{} run {}", mode.name(), i + 1),
                timeline: r.timeline.clone(),
                dashed: m > 0,
                color: m,
            });
        }
        let receivers = Spread::of(
            runs.iter()
                .map(|r| (r.cpu_secs - r.sender_cpu_secs) / (r.delivered as f64 / 1e9))
                .collect(),
        );
        modes.push(json!({
            "mode": mode.name(),
            "runs": runs.len(),
            "aggregate_bytes_per_sec": f.rate,
            "cpu_secs_per_gb": f.cpu_per_gb,
            "sender_thread_cpu_secs_per_gb": f.sender_cpu_per_gb,
            "subscriber_threads_cpu_secs_per_gb": receivers,
            "bytes_per_call": f.bytes_per_call,
            "run_secs": runs.iter().map(|r| r.secs).collect::<Vec<_>>(),
        }));
        human.push((*mode, f, receivers));
    }
    let labels = Labels {
        title: format!(
            "trickle-relay bench fanout-copy: {} subscribers x {:.1} MiB segment",
            args.subscribers,
            args.bytes as f64 / (1024.0 * 1024.0)
        ),
        params: format!(
            "one sender thread, loopback; {} KiB pieces; {} run(s) per mode; {} CPU(s)",
            args.chunk_bytes / 1024,
            args.repeat,
            report::cpus()
        ),
        latency: "one send call (vectored write or sendfile)".into(),
        throughput: "bytes received by all subscribers".into(),
        unit: "GB/s".into(),
        scale: 1e9,
        since: "the sender's first call".into(),
    };
    let summary = json!({
        "subscribers": args.subscribers,
        "segment_bytes": args.bytes,
        "chunk_bytes": args.chunk_bytes,
        "modes": modes,
    });
    report::finish(
        "fanout_copy",
        &args.common,
        summary,
        &recording,
        &labels,
        || print_human(args, &human),
    )
}

/// The text summary: one line per mode, then the ratio of the first two.
fn print_human(args: &Args, modes: &[(Mode, Figures, Spread)]) {
    println!(
        "fanout-copy (one sender thread, loopback): {} subscribers x {:.1} MiB segment, {} KiB pieces, {} run(s) per mode",
        args.subscribers,
        args.bytes as f64 / (1024.0 * 1024.0),
        args.chunk_bytes / 1024,
        args.repeat
    );
    println!(
        "  {:<9} {:>22} {:>26} {:>18} {:>18} {:>12}",
        "mode",
        "delivered GB/s",
        "process cpu-s per GB",
        "sender thread",
        "subscribers",
        "KiB per call"
    );
    let spread = |s: &Spread| format!("{:.3} [{:.3}..{:.3}]", s.median, s.min, s.max);
    for (mode, f, receivers) in modes {
        let rate = Spread {
            median: f.rate.median / 1e9,
            min: f.rate.min / 1e9,
            max: f.rate.max / 1e9,
        };
        println!(
            "  {:<9} {:>22} {:>26} {:>18.3} {:>18.3} {:>12.0}",
            mode.name(),
            spread(&rate),
            spread(&f.cpu_per_gb),
            f.sender_cpu_per_gb.median,
            receivers.median,
            f.bytes_per_call / 1024.0
        );
    }
    if let [(a, fa, _), (b, fb, _), ..] = modes {
        println!(
            "  {} / {}: process CPU per GB {:.2}x, sender thread {:.2}x (medians; the process figure is the one to read on loopback)",
            b.name(),
            a.name(),
            fb.cpu_per_gb.median / fa.cpu_per_gb.median,
            fb.sender_cpu_per_gb.median / fa.sender_cpu_per_gb.median
        );
    }
}
