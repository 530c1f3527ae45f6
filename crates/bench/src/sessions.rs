//! `trickle-relay bench sessions`: many concurrent sessions on one trickle server, and what each
//! costs the server.
//!
//! For each N of `--sessions` (a list runs each in turn, on fresh processes): a trickle server
//! process (`trickle-relay serve --autocreate` with its default limits, unless `--server` names
//! one), every runner in one process and every client in another (`bench sessions-runners` /
//! `sessions-clients`, see [`super::sessions_child`]: the real runner and client roles, many per
//! process). Each session gets its own control and events channels; its runner's simulated
//! pipeline sends a heartbeat every `--heartbeat-ms` plus the session lifecycle events
//! (`runner_ready`, `session_created`, `pipeline_load_start`, `pipeline_loaded`, `stream_started`,
//! `playback_ready`, then `stream_stopped`, `pipeline_unloaded`, `session_closed`); its client
//! egresses them to a counting sink.
//!
//! Phases: set-up (channels created, clients connected, runners started, at most `--window`
//! sessions at a time, until every stream started), the steady window (`--duration-secs`, all
//! sessions streaming), teardown (every stream stopped and every session closed, until every
//! events channel ended). Reported per N:
//! - the server's RSS (at the end of the window, and its peak) and RSS per session (above the
//!   idle server's), its CPU over the window (cores busy, µs per session-second, µs per event),
//!   its open descriptors and connections (at the end of the window, and after teardown);
//! - origin-to-egress latency (the envelope's `timestamp`, unix ms, to the client's egress:
//!   1 ms resolution) of the events egressed in the window: median, p99, max;
//! - events emitted (the runners' sinks), egressed, dropped (counted and reported downstream),
//!   and lost (`emitted - dropped - egressed`, per session: must be 0), duplicates;
//! - set-up and teardown time.
//!
//! Ten thousand sessions hold about 90,000 connections on the server and 45,000 in each child,
//! so the bench raises its open-file limit (children inherit it; it says so), and spreads each
//! child's connections over several loopback source addresses (`127.0.0.x`; one address has
//! ~28,000 ephemeral ports towards one server port).

use super::plot::{fmt_num, Axis, Figure, Panel, Series};
use super::relay::{check_exit, read_report, start_server, Proc};
use super::relay_child::{cpu_secs, peak_rss_kib};
use super::report::{self, CommonArgs};
use super::sessions_child::{ClientsReport, Quantiles, RunnersReport};
use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};
use trickle::server::limits::{open_file_limit, raise_open_file_limit, OpenFiles};

/// Arguments of `trickle-relay bench sessions`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Concurrent sessions; a comma-separated list (e.g. 100,1000,5000,10000) runs each N in
    /// turn, on fresh processes, and plots the cost against N.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub sessions: Vec<usize>,
    /// Heartbeat interval of every session, in ms (the seed's is 10,000).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Length of the steady window (every session streaming), in seconds.
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    /// Use this trickle server (base URL, started with --autocreate) instead of starting one.
    #[arg(long)]
    pub server: Option<String>,
    /// Process id of the `--server`, to report its memory, CPU and descriptors.
    #[arg(long, requires = "server")]
    pub server_pid: Option<u32>,
    /// Loopback source addresses per child process; 0: one per 2,000 sessions (at least one).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: usize,
    /// Sessions being set up (or torn down) at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Give up on set-up, or on teardown, after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Keep the children's logs and reports (their folder is printed on stderr).
    #[arg(long)]
    pub keep_logs: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Descriptors a process holding `n` sessions' connections may need: the server 8 per session
/// (each child 4), about one more for keep-alive connections idle between segments, a margin,
/// and the server's reserve. Ten thousand sessions need ~122,000: more than many machines' hard
/// limit (raising that needs privileges: `ulimit -Hn` as root, or a container's `--ulimit nofile=`).
fn files_needed(n: usize) -> u64 {
    // The server holds ~9.1 connections per session (12,765 at N = 1,400: 8 in flight, plus idle
    // keep-alive ones); its connection limit is its open-file limit less a reserve of up to 1,024.
    (n as u64) * 10 + 1100
}

/// One sample of a process from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    cpu_secs: Option<f64>,
    fds: Option<u64>,
    sockets: Option<u64>,
}

/// Reads `VmRSS`, `VmHWM`, CPU time, and counts the open descriptors (and the sockets among
/// them) of process `pid`. Counting sockets reads every descriptor's link: call it a few times
/// per run, not in a loop.
fn sample(pid: Option<&str>, descriptors: bool) -> Sample {
    let Some(pid) = pid else {
        return Sample::default();
    };
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        });
    let (fds, sockets) = if descriptors {
        match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(dir) => {
                let (mut fds, mut sockets) = (0u64, 0u64);
                for entry in dir.flatten() {
                    fds += 1;
                    if std::fs::read_link(entry.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                    {
                        sockets += 1;
                    }
                }
                (Some(fds), Some(sockets))
            }
            Err(_) => (None, None),
        }
    } else {
        (None, None)
    };
    Sample {
        rss_kib,
        peak_rss_kib: peak_rss_kib(pid),
        cpu_secs: cpu_secs(pid),
        fds,
        sockets,
    }
}

/// The `k` source addresses of child `side` (0: clients, 1: runners): `127.0.0.2` onwards.
fn source_ips(side: usize, k: usize) -> Vec<IpAddr> {
    (0..k)
        .map(|j| {
            let host = 2 + side * k + j;
            let (c, d) = ((host / 250) as u8, (host % 250) as u8);
            IpAddr::V4(Ipv4Addr::new(127, 0, c, d.max(1)))
        })
        .collect()
}

/// What one N measured.
struct NResult {
    sessions: usize,
    source_addrs: usize,
    setup_secs: f64,
    teardown_secs: f64,
    window_secs: f64,
    events_in_window: u64,
    idle: Sample,
    start: Sample,
    end: Sample,
    after: Sample,
    runners: RunnersReport,
    clients: ClientsReport,
    runners_sample: Sample,
    clients_sample: Sample,
}

/// Event accounting over every session.
#[derive(Debug, Default, Clone, Copy)]
struct Accounting {
    emitted: u64,
    egressed: u64,
    dropped: u64,
    dropped_reported: u64,
    lost: u64,
    extra: u64,
    duplicates: u64,
    rejected: u64,
    skipped_segments: u64,
    sessions_with_loss: u64,
    sessions_failed: u64,
}

impl NResult {
    fn accounting(&self) -> Accounting {
        let mut a = Accounting::default();
        for (i, c) in self.clients.sessions.iter().enumerate() {
            let r = self.runners.sessions.get(i).copied().flatten();
            let Some(r) = r.filter(|r| !r.failed) else {
                a.sessions_failed += 1;
                continue;
            };
            if c.error.is_some() {
                a.sessions_failed += 1;
            }
            a.emitted += r.emitted;
            a.dropped += r.dropped;
            a.egressed += c.egressed;
            a.dropped_reported += c.dropped_reported;
            a.duplicates += c.duplicates;
            a.rejected += c.rejected;
            a.skipped_segments += c.skipped_segments;
            let expected = r.emitted.saturating_sub(r.dropped);
            if c.egressed < expected {
                a.lost += expected - c.egressed;
                a.sessions_with_loss += 1;
            } else {
                a.extra += c.egressed - expected;
            }
        }
        a
    }

    fn server_cpu_secs(&self) -> Option<f64> {
        Some(self.end.cpu_secs? - self.start.cpu_secs?)
    }

    fn server_cores(&self) -> Option<f64> {
        self.server_cpu_secs()
            .map(|c| c / self.window_secs.max(1e-9))
    }

    /// Server CPU per session, in µs per second of the session.
    fn cpu_us_per_session_s(&self) -> Option<f64> {
        self.server_cores()
            .map(|c| c * 1e6 / self.sessions.max(1) as f64)
    }

    fn cpu_us_per_event(&self) -> Option<f64> {
        self.server_cpu_secs()
            .map(|c| c * 1e6 / self.events_in_window.max(1) as f64)
    }

    fn rss_per_session_kib(&self) -> Option<f64> {
        let grown = self
            .end
            .rss_kib?
            .saturating_sub(self.idle.rss_kib.unwrap_or(0));
        Some(grown as f64 / self.sessions.max(1) as f64)
    }

    fn connections(s: &Sample) -> Option<u64> {
        // Our server's one listening socket is not a connection.
        s.sockets.map(|n| n.saturating_sub(1))
    }

    fn to_json(&self) -> Value {
        let a = self.accounting();
        let q = |q: &Quantiles| {
            json!({
                "samples": q.samples,
                "median_ms": q.median as f64 / 1000.0,
                "p99_ms": q.p99 as f64 / 1000.0,
                "p999_ms": q.p999 as f64 / 1000.0,
                "max_ms": q.max as f64 / 1000.0,
            })
        };
        let proc_json = |s: &Sample| {
            json!({
                "rss_kib": s.rss_kib, "peak_rss_kib": s.peak_rss_kib, "cpu_secs": s.cpu_secs,
                "fds": s.fds, "sockets": s.sockets,
            })
        };
        json!({
            "sessions": self.sessions,
            "source_addrs_per_child": self.source_addrs,
            "setup_secs": self.setup_secs,
            "teardown_secs": self.teardown_secs,
            "window_secs": self.window_secs,
            "events_in_window": self.events_in_window,
            "events_per_sec": self.events_in_window as f64 / self.window_secs.max(1e-9),
            "server": {
                "rss_kib": self.end.rss_kib,
                "peak_rss_kib": self.end.peak_rss_kib,
                "idle_rss_kib": self.idle.rss_kib,
                "rss_per_session_kib": self.rss_per_session_kib(),
                "cpu_secs_in_window": self.server_cpu_secs(),
                "cores_busy": self.server_cores(),
                "cpu_us_per_session_second": self.cpu_us_per_session_s(),
                "cpu_us_per_event": self.cpu_us_per_event(),
                "fds": self.end.fds,
                "connections": Self::connections(&self.end),
                "fds_after_teardown": self.after.fds,
                "connections_after_teardown": Self::connections(&self.after),
            },
            "latency": {
                "window": q(&self.clients.latency_steady_us),
                "all_events": q(&self.clients.latency_all_us),
            },
            "events": {
                "emitted": a.emitted,
                "egressed": a.egressed,
                "dropped": a.dropped,
                "dropped_reported": a.dropped_reported,
                "lost": a.lost,
                "extra": a.extra,
                "duplicates": a.duplicates,
                "rejected": a.rejected,
                "skipped_segments": a.skipped_segments,
                "sessions_with_loss": a.sessions_with_loss,
                "sessions_failed": a.sessions_failed,
            },
            "runners_process": proc_json(&self.runners_sample),
            "clients_process": proc_json(&self.clients_sample),
        })
    }
}

/// Runs the benchmark: each N in turn, then the summary (and the plot).
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.sessions.is_empty() && args.sessions.iter().all(|n| *n > 0),
        "--sessions takes one or more counts, each at least 1"
    );
    anyhow::ensure!(args.heartbeat_ms > 0, "--heartbeat-ms must be at least 1");
    args.common.check()?;
    let most = args.sessions.iter().copied().max().unwrap_or(1);
    let before = open_file_limit();
    let files = raise_open_file_limit(Some(files_needed(most)));
    eprintln!("{}", files_line(&before, &files, most));
    anyhow::ensure!(
        files.soft >= files_needed(most),
        "{} sessions need about {} open files per process (the server holds about 9 connections per session), and the limit is {} (hard {}) and could not be raised: raise the hard limit (`ulimit -Hn` as root, or the container's `--ulimit nofile=`), then run again",
        most,
        files_needed(most),
        files.soft,
        files.hard
    );
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let dir = report::ScratchDir::new(None, "sessions")?;
    let mut results = Vec::with_capacity(args.sessions.len());
    let mut failure = None;
    for (run, &n) in args.sessions.iter().enumerate() {
        match run_one(&exe, dir.path(), &args, n, run).await {
            Ok(r) => {
                if !args.common.json {
                    print_one(&r);
                }
                results.push(r);
            }
            Err(e) => {
                failure = Some(e.context(format!("bench sessions with N = {n}")));
                break;
            }
        }
    }
    let lost: u64 = results.iter().map(|r| r.accounting().lost).sum();
    let failed: u64 = results.iter().map(|r| r.accounting().sessions_failed).sum();
    if failure.is_some() || args.keep_logs || lost > 0 || failed > 0 {
        // Keep the children's logs when something failed; they are named in the error.
        let kept = dir.path().with_extension("kept");
        let _ = std::fs::rename(dir.path(), &kept);
        eprintln!(
            "bench sessions: children's logs and reports in {}",
            kept.display()
        );
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(path) = &args.common.plot {
        figure(&args, &results).write(path)?;
    }
    if args.common.json {
        let summary = json!({
            "bench": "sessions",
            "cpus": report::cpus(),
            "heartbeat_ms": args.heartbeat_ms,
            "duration_secs": args.duration_secs,
            "external_server": args.server,
            "open_files": { "soft": files.soft, "hard": files.hard, "raised_from": files.raised_from },
            "plot": args.common.plot.as_ref().map(|p| p.display().to_string()),
            "runs": results.iter().map(NResult::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&args, &results);
        if let Some(path) = &args.common.plot {
            println!("plot: {}", path.display());
        }
    }
    if lost > 0 || failed > 0 {
        let first = results
            .iter()
            .flat_map(|r| r.clients.sessions.iter())
            .find_map(|c| c.error.clone())
            .unwrap_or_default();
        bail!("{lost} event(s) lost and {failed} session(s) failed (first: {first}): every event must be accounted for");
    }
    Ok(())
}

fn files_line(before: &OpenFiles, now: &OpenFiles, n: usize) -> String {
    match now.raised_from {
        Some(from) => format!(
            "bench sessions: open-file limit raised from {from} to {} (hard {}) for {n} sessions; the children inherit it",
            now.soft, now.hard
        ),
        None => format!(
            "bench sessions: open-file limit {} (hard {}, was soft {}); {n} sessions need about {}",
            now.soft,
            now.hard,
            before.soft,
            files_needed(n)
        ),
    }
}

/// Reads lines from a child's stdout.
type Out = Lines<BufReader<ChildStdout>>;

/// The two children of one run, and the lines they print.
struct Children {
    runners: Proc,
    clients: Proc,
    runners_in: Option<ChildStdin>,
    clients_in: Option<ChildStdin>,
    runners_out: Out,
    clients_out: Out,
    runners_done: bool,
}

impl Children {
    /// The clients' next line, forwarding `start I` to the runners and following the runners'
    /// output (and failure) meanwhile. `None` when the clients' stdout ended.
    async fn next_clients_line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            tokio::select! {
                line = self.clients_out.next_line() => {
                    let Some(line) = line.context("reading the clients' output")? else {
                        return Ok(None);
                    };
                    if line.starts_with("start ") {
                        let Some(stdin) = self.runners_in.as_mut() else {
                            continue;
                        };
                        stdin.write_all(line.as_bytes()).await.context("writing to the runners")?;
                        stdin.write_all(b"\n").await.context("writing to the runners")?;
                        continue;
                    }
                    return Ok(Some(line));
                }
                line = self.runners_out.next_line(), if !self.runners_done => match line {
                    Ok(Some(_)) => {}
                    _ => {
                        self.runners_done = true;
                        let status = self.runners.child.wait().await?;
                        if !status.success() {
                            return Err(self.runners.failed(format!("the runners process failed ({status})")));
                        }
                    }
                },
            }
        }
    }

    /// Sends a command to the clients.
    async fn tell_clients(&mut self, cmd: &str) -> anyhow::Result<()> {
        let stdin = self.clients_in.as_mut().context("clients stdin")?;
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .context("writing to the clients")
    }

    /// Waits for the clients line starting with `prefix`; its rest.
    async fn expect(
        &mut self,
        prefix: &str,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<String> {
        loop {
            match self.next_clients_line().await? {
                Some(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                    if let Some(p) = line.strip_prefix("progress ") {
                        bar.set_message(p.to_string());
                    }
                }
                None => {
                    let status = self.clients.child.wait().await?;
                    return Err(self.clients.failed(format!(
                        "the clients process ended ({status}) before saying `{prefix}`"
                    )));
                }
            }
        }
    }

    async fn stop(&mut self) {
        self.runners.stop().await;
        self.clients.stop().await;
    }
}

async fn run_one(
    exe: &Path,
    dir: &Path,
    args: &Args,
    n: usize,
    run: usize,
) -> anyhow::Result<NResult> {
    let (mut server, base) = match &args.server {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let (p, url) = start_server(exe, dir, &format!("run{}", run + 1), false).await?;
            (Some(p), url)
        }
    };
    let server_pid = match &server {
        Some(p) => p.pid(),
        None => args.server_pid.map(|p| p.to_string()),
    };
    let result = drive(exe, dir, args, n, run, &base, server_pid.as_deref()).await;
    if let Some(s) = server.as_mut() {
        s.stop().await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    exe: &Path,
    dir: &Path,
    args: &Args,
    n: usize,
    run: usize,
    base: &str,
    server_pid: Option<&str>,
) -> anyhow::Result<NResult> {
    let idle = sample(server_pid, true);
    let k = if args.source_addrs > 0 {
        args.source_addrs
    } else {
        n.div_ceil(2000).max(1)
    };
    let ips = |side: usize| {
        source_ips(side, k)
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let tag = format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let runners_report = dir.join(format!("run{}-runners.json", run + 1));
    let clients_report = dir.join(format!("run{}-clients.json", run + 1));
    let n_s = n.to_string();
    let common = |report: &Path, side: usize| -> Vec<String> {
        vec![
            "--server".into(),
            base.to_string(),
            "--tag".into(),
            tag.clone(),
            "--sessions".into(),
            n_s.clone(),
            "--source-ips".into(),
            ips(side),
            "--report".into(),
            report.to_string_lossy().into_owned(),
        ]
    };
    let mut runner_args = vec!["bench".to_string(), "sessions-runners".into()];
    runner_args.extend(common(&runners_report, 1));
    runner_args.extend(["--heartbeat-ms".into(), args.heartbeat_ms.to_string()]);
    let mut client_args = vec!["bench".to_string(), "sessions-clients".into()];
    client_args.extend(common(&clients_report, 0));
    client_args.extend(["--window".into(), args.window.max(1).to_string()]);
    fn as_str(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let prefix = format!("run{}", run + 1);
    let mut runners = Proc::spawn("runners", exe, &as_str(&runner_args), dir, &prefix, true)?;
    let mut clients = Proc::spawn("clients", exe, &as_str(&client_args), dir, &prefix, true)?;
    let mut children = Children {
        runners_in: runners.child.stdin.take(),
        clients_in: clients.child.stdin.take(),
        runners_out: BufReader::new(runners.child.stdout.take().context("runners stdout")?).lines(),
        clients_out: BufReader::new(clients.child.stdout.take().context("clients stdout")?).lines(),
        runners,
        clients,
        runners_done: false,
    };
    let result = phases(&mut children, args, n, run, server_pid).await;
    if result.is_err() {
        children.stop().await;
    }
    let mut m = result?;
    m.idle = idle;
    m.source_addrs = k;
    m.runners = read_report(&runners_report, &children.runners)?;
    m.clients = read_report(&clients_report, &children.clients)?;
    Ok(m)
}

/// Set-up, the steady window, teardown.
async fn phases(
    c: &mut Children,
    args: &Args,
    n: usize,
    run: usize,
    server_pid: Option<&str>,
) -> anyhow::Result<NResult> {
    let bar = report::progress(3, "sessions");
    bar.set_prefix(format!("N = {n}"));
    let limit = Duration::from_secs(args.timeout_secs);
    bar.set_message("setting up");
    let up = tokio::time::timeout(limit, c.expect("up ", &bar))
        .await
        .map_err(|_| {
            anyhow::anyhow!("set-up did not finish within {limit:?} (--timeout-secs)")
        })??;
    let setup_secs: f64 = up
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    bar.inc(1);

    // The steady window, between two marks.
    bar.set_message(format!("{} s steady window", args.duration_secs));
    c.tell_clients("mark").await?;
    let count0: u64 = c.expect("count ", &bar).await?.parse().unwrap_or(0);
    let t0 = Instant::now();
    let start = sample(server_pid, false);
    tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
    let end_cpu = sample(server_pid, false);
    let window_secs = t0.elapsed().as_secs_f64();
    c.tell_clients("mark").await?;
    let count1: u64 = c.expect("count ", &bar).await?.parse().unwrap_or(0);
    // Descriptors are counted after the CPU sample: reading 80,000 links costs the bench CPU.
    let end = Sample {
        cpu_secs: end_cpu.cpu_secs,
        ..sample(server_pid, true)
    };
    let runners_sample = sample(c.runners.pid().as_deref(), true);
    let clients_sample = sample(c.clients.pid().as_deref(), true);
    bar.inc(1);

    // Teardown: until both children are done.
    bar.set_message("tearing down");
    let t = Instant::now();
    c.tell_clients("stop").await?;
    // Closed stdins end the children's stdin readers (a tokio runtime waits for them on exit).
    c.clients_in = None;
    tokio::time::timeout(limit, async {
        c.expect("down ", &bar).await?;
        c.runners_in = None;
        let status = c.clients.child.wait().await?;
        check_exit(&c.clients, status)?;
        while !c.runners_done {
            match c.runners_out.next_line().await {
                Ok(Some(_)) => {}
                _ => c.runners_done = true,
            }
        }
        let status = c.runners.child.wait().await?;
        check_exit(&c.runners, status)
    })
    .await
    .map_err(|_| anyhow::anyhow!("teardown did not finish within {limit:?} (--timeout-secs)"))??;
    let teardown_secs = t.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // What the sessions leave behind once closed (connections close as the server sees the FINs).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = sample(server_pid, true);
    let _ = run;
    Ok(NResult {
        sessions: n,
        source_addrs: 0,
        setup_secs,
        teardown_secs,
        window_secs,
        events_in_window: count1.saturating_sub(count0),
        idle: Sample::default(),
        start,
        end,
        after,
        runners: RunnersReport::default(),
        clients: ClientsReport::default(),
        runners_sample,
        clients_sample,
    })
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

fn mib(kib: Option<u64>) -> String {
    opt(kib.map(|k| k as f64), |k| format!("{:.1} MiB", k / 1024.0))
}

fn print_one(r: &NResult) {
    let a = r.accounting();
    let (w, all) = (&r.clients.latency_steady_us, &r.clients.latency_all_us);
    println!(
        "N = {}: set up in {:.1} s, torn down in {:.1} s; {} source address(es) per child",
        r.sessions, r.setup_secs, r.teardown_secs, r.source_addrs
    );
    println!(
        "  server: RSS {} (peak {}, idle {}), {} per session; CPU {} cores over {:.1} s = {} µs per session-second, {} µs per event",
        mib(r.end.rss_kib),
        mib(r.end.peak_rss_kib),
        mib(r.idle.rss_kib),
        opt(r.rss_per_session_kib(), |k| format!("{k:.1} KiB")),
        opt(r.server_cores(), |c| format!("{c:.3}")),
        r.window_secs,
        opt(r.cpu_us_per_session_s(), |c| format!("{c:.1}")),
        opt(r.cpu_us_per_event(), |c| format!("{c:.1}")),
    );
    println!(
        "  server: {} descriptors, {} connections at the end of the window; {} / {} after teardown",
        opt(r.end.fds.map(|v| v as f64), |v| format!("{v}")),
        opt(NResult::connections(&r.end).map(|v| v as f64), |v| format!(
            "{v}"
        )),
        opt(r.after.fds.map(|v| v as f64), |v| format!("{v}")),
        opt(
            NResult::connections(&r.after).map(|v| v as f64),
            |v| format!("{v}")
        ),
    );
    println!(
        "  latency origin to egress, window ({} events, {:.0}/s): median {:.1} ms, p99 {:.1} ms, max {:.1} ms; all events: max {:.1} ms",
        w.samples,
        r.events_in_window as f64 / r.window_secs.max(1e-9),
        w.median as f64 / 1000.0,
        w.p99 as f64 / 1000.0,
        w.max as f64 / 1000.0,
        all.max as f64 / 1000.0,
    );
    println!(
        "  events: {} emitted, {} egressed, {} dropped ({} reported), {} lost, {} duplicates; {} session(s) failed",
        a.emitted, a.egressed, a.dropped, a.dropped_reported, a.lost, a.duplicates, a.sessions_failed
    );
    println!(
        "  runners process: RSS {}, CPU {}; clients process: RSS {}, CPU {}",
        mib(r.runners_sample.rss_kib),
        opt(r.runners_sample.cpu_secs, |c| format!("{c:.1} s")),
        mib(r.clients_sample.rss_kib),
        opt(r.clients_sample.cpu_secs, |c| format!("{c:.1} s")),
    );
}

fn print_table(args: &Args, results: &[NResult]) {
    println!(
        "bench sessions: {} CPU(s), heartbeat every {} ms, {} s window; server {}",
        report::cpus(),
        args.heartbeat_ms,
        args.duration_secs,
        args.server
            .as_deref()
            .unwrap_or("started by the bench (default limits)")
    );
    println!(
        "{:>7} {:>10} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "N",
        "RSS MiB",
        "KiB/sess",
        "cores",
        "µs/event",
        "conns",
        "p50 ms",
        "p99 ms",
        "max ms",
        "events",
        "lost",
        "setup s",
        "down s"
    );
    for r in results {
        let a = r.accounting();
        let w = &r.clients.latency_steady_us;
        println!(
            "{:>7} {:>10} {:>9} {:>7} {:>9} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>8} {:>6} {:>7.1} {:>7.1}",
            r.sessions,
            opt(r.end.rss_kib.map(|k| k as f64), |k| format!("{:.1}", k / 1024.0)),
            opt(r.rss_per_session_kib(), |k| format!("{k:.1}")),
            opt(r.server_cores(), |c| format!("{c:.3}")),
            opt(r.cpu_us_per_event(), |c| format!("{c:.1}")),
            opt(NResult::connections(&r.end).map(|v| v as f64), |v| format!("{v}")),
            w.median as f64 / 1000.0,
            w.p99 as f64 / 1000.0,
            w.max as f64 / 1000.0,
            a.emitted,
            a.lost,
            r.setup_secs,
            r.teardown_secs,
        );
    }
}

/// Cost against N: the server's memory, its CPU, and latency, one point per N.
fn figure(args: &Args, results: &[NResult]) -> Figure {
    let xs = |f: &dyn Fn(&NResult) -> Option<f64>| -> Vec<(f64, f64)> {
        results
            .iter()
            .filter_map(|r| f(r).map(|y| (r.sessions as f64, y)))
            .collect()
    };
    let line = |label: &str, points: Vec<(f64, f64)>, color: usize, dashed: bool| Series {
        label: label.into(),
        points,
        color,
        dashed,
    };
    let span = |v: f64| -> Vec<(f64, f64)> {
        let lo = results.iter().map(|r| r.sessions).min().unwrap_or(1) as f64;
        let hi = results.iter().map(|r| r.sessions).max().unwrap_or(1) as f64;
        vec![(lo, v), (hi, v)]
    };
    let q = |f: fn(&Quantiles) -> u64| {
        xs(&|r: &NResult| Some(f(&r.clients.latency_steady_us) as f64 / 1000.0))
    };
    let last = results.last();
    Figure {
        title: format!(
            "trickle-relay bench sessions: cost against concurrent sessions (heartbeat {} ms)",
            args.heartbeat_ms
        ),
        subtitle: format!(
            "{} CPU(s); {} s steady window per N; largest N = {}: server RSS {}, {} cores, p99 {} ms, {} lost",
            report::cpus(),
            args.duration_secs,
            last.map_or(0, |r| r.sessions),
            mib(last.and_then(|r| r.end.rss_kib)),
            opt(last.and_then(NResult::server_cores), |c| format!("{c:.2}")),
            last.map_or("-".into(), |r| fmt_num(r.clients.latency_steady_us.p99 as f64 / 1000.0)),
            results.iter().map(|r| r.accounting().lost).sum::<u64>(),
        ),
        panels: vec![
            Panel {
                title: "Server memory".into(),
                x_label: "concurrent sessions".into(),
                y_label: "MiB (log scale)".into(),
                x_axis: Axis::Log10,
                y_axis: Axis::Log10,
                series: vec![
                    line("RSS", xs(&|r| r.end.rss_kib.map(|k| k as f64 / 1024.0)), 0, false),
                    line("target 1 GiB", span(1024.0), 1, true),
                ],
            },
            Panel {
                title: "Server CPU over the window".into(),
                x_label: "concurrent sessions".into(),
                y_label: "cores busy".into(),
                x_axis: Axis::Log10,
                y_axis: Axis::Linear,
                series: vec![
                    line("server", xs(&|r| r.server_cores()), 0, false),
                    line("target 1 core", span(1.0), 1, true),
                ],
            },
            Panel {
                title: "Origin-to-egress latency (window)".into(),
                x_label: "concurrent sessions".into(),
                y_label: "ms (log scale)".into(),
                x_axis: Axis::Log10,
                y_axis: Axis::Log10,
                series: vec![
                    line("median", q(|q| q.median), 0, false),
                    line("p99", q(|q| q.p99), 2, false),
                    line("max", q(|q| q.max), 3, false),
                    line("target p99 100 ms", span(100.0), 1, true),
                ],
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_loopback_addresses() {
        let clients = source_ips(0, 3);
        let runners = source_ips(1, 3);
        assert_eq!(clients[0].to_string(), "127.0.0.2");
        assert_eq!(runners[0].to_string(), "127.0.0.5");
        let mut all: Vec<_> = clients.iter().chain(&runners).collect();
        all.dedup();
        assert_eq!(all.len(), 6);
        assert!(all.iter().all(|ip| ip.is_loopback()));
    }
}
