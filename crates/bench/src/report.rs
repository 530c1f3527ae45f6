//! What the benches share: the common arguments (`--json`, `--plot`), median-and-spread figures,
//! the recordings behind the plot (latency histograms, throughput timelines), scratch
//! directories, the progress bar, and the printer that ends every bench the same way.
//!
//! Every bench's JSON carries the same header fields (`bench`, `cpus`, `plot`) and a `curves`
//! object summarising what the plot draws; the rest is the bench's own figures.

use super::plot::{fmt_num, Axis, Figure, Mark, Panel, Series};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments every bench (but `relay`, which has its own) takes, flattened into its `Args`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Draw the latency distribution and the throughput over time to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

impl CommonArgs {
    /// Fails before the bench runs (not after minutes of it) when `--plot` cannot be written.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.plot {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(dir) = parent {
                anyhow::ensure!(
                    dir.is_dir(),
                    "--plot {}: the folder {} does not exist (create it, or pick another path)",
                    path.display(),
                    dir.display()
                );
            }
            anyhow::ensure!(
                !path.is_dir(),
                "--plot {}: is a folder, give a file name",
                path.display()
            );
        }
        Ok(())
    }
}

/// Median and spread of one figure over the repeats.
#[derive(Serialize, Debug, Clone, Copy, Default, PartialEq)]
pub struct Spread {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `v` (all zero when `v` is empty).
    pub fn of(mut v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// A latency histogram in nanoseconds: 1 ns to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// Records `d` into a nanosecond histogram (values past its range are clamped, not lost).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(d.as_nanos().min(u128::from(u64::MAX)) as u64);
}

/// Width of a [`Timeline`] slot, in ms: fine enough for runs of a few tens of ms.
const SLOT_MS: u64 = 1;
/// Slots kept (two hours); later counts land in the last slot rather than growing forever.
const MAX_SLOTS: usize = 2 * 3600 * 1000 / SLOT_MS as usize;

/// Counts (events or bytes) per 1 ms slot since an origin, re-binned for the plot.
#[derive(Debug, Clone)]
pub struct Timeline {
    origin: Instant,
    slots: Vec<u64>,
}

impl Timeline {
    /// An empty timeline starting at `origin`.
    pub fn new(origin: Instant) -> Timeline {
        Timeline {
            origin,
            slots: Vec::new(),
        }
    }

    /// The moment time zero stands for.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Counts `n` at `at` (before the origin counts as at the origin).
    pub fn record(&mut self, at: Instant, n: u64) {
        let ms = at.saturating_duration_since(self.origin).as_millis() as u64 / SLOT_MS;
        let i = (ms as usize).min(MAX_SLOTS - 1);
        if self.slots.len() <= i {
            self.slots.resize(i + 1, 0);
        }
        self.slots[i] += n;
    }

    /// Adds another timeline's counts (shifted onto this one's origin).
    pub fn merge(&mut self, other: &Timeline) {
        let last = other.slots.len().saturating_sub(1);
        for (k, &n) in other.slots.iter().enumerate() {
            if n > 0 || k == last {
                let at = other.origin + Duration::from_millis(k as u64 * SLOT_MS);
                self.record(at, n);
            }
        }
    }

    /// Everything counted.
    pub fn total(&self) -> u64 {
        self.slots.iter().sum()
    }

    /// How long the timeline runs, in ms (to the end of its last slot).
    pub fn span_ms(&self) -> u64 {
        self.slots.len() as u64 * SLOT_MS
    }

    /// `(seconds since the origin at the bucket's middle, count per second)` per `width_ms`
    /// bucket; the last, partial bucket is divided by its own length.
    pub fn rates(&self, width_ms: u64) -> Vec<(f64, f64)> {
        let per = (width_ms / SLOT_MS).max(1) as usize;
        self.slots
            .chunks(per)
            .enumerate()
            .map(|(k, c)| {
                let secs = (c.len() as u64 * SLOT_MS) as f64 / 1000.0;
                let start = (k * per) as f64 * SLOT_MS as f64 / 1000.0;
                (start + secs / 2.0, c.iter().sum::<u64>() as f64 / secs)
            })
            .collect()
    }
}

/// Samples `N` monotonic counters every millisecond on its own thread, one [`Timeline`] each
/// (for counters another thread advances: events accepted, acknowledged, delivered).
pub struct Sampler<const N: usize> {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<[Timeline; N]>>,
}

impl<const N: usize> Sampler<N> {
    /// Starts sampling `read` against `origin` (the counters' values at the start count as 0).
    pub fn start(origin: Instant, read: impl Fn() -> [u64; N] + Send + 'static) -> Sampler<N> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // The baseline is read here, before the caller goes on: counts made while the thread
        // starts are then still counted.
        let mut last = read();
        let handle = std::thread::spawn(move || {
            let mut lines: [Timeline; N] = std::array::from_fn(|_| Timeline::new(origin));
            loop {
                let done = flag.load(Ordering::Acquire);
                let now = read();
                let at = Instant::now();
                for (k, line) in lines.iter_mut().enumerate() {
                    line.record(at, now[k].saturating_sub(last[k]));
                }
                last = now;
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(SLOT_MS));
            }
            lines
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Takes a last sample and returns the timelines.
    pub fn stop(mut self) -> anyhow::Result<[Timeline; N]> {
        self.stop.store(true, Ordering::Release);
        self.handle
            .take()
            .ok_or_else(|| anyhow::anyhow!("the sampler was already stopped"))?
            .join()
            .map_err(|_| anyhow::anyhow!("the sampling thread panicked"))
    }
}

impl<const N: usize> Drop for Sampler<N> {
    /// A run that fails before `stop` still ends the thread (and drops what it samples).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// The bucket width (1, 2 or 5 times a power of ten ms) that draws `span_ms` in at most about
/// 60 points: fine enough to show stalls, coarse enough that scheduling noise averages out.
pub fn bucket_ms(span_ms: u64) -> u64 {
    let mut w = 1u64;
    loop {
        for m in [1, 2, 5] {
            if span_ms / (w * m) <= 60 {
                return w * m;
            }
        }
        w *= 10;
    }
}

/// One latency distribution to draw.
#[derive(Debug, Clone)]
pub struct LatencySeries {
    /// Legend text (the scenario).
    pub label: String,
    /// Samples in ns.
    pub hist: Histogram<u64>,
}

/// One throughput line to draw.
#[derive(Debug, Clone)]
pub struct ThroughputSeries {
    /// Legend text.
    pub label: String,
    /// Counts over time.
    pub timeline: Timeline,
    /// Drawn dashed (an offered rate, beside the solid achieved one).
    pub dashed: bool,
    /// Palette index; series of one scenario share it.
    pub color: usize,
}

/// What a bench records for its plot.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// Latency distributions, one colour each.
    pub latency: Vec<LatencySeries>,
    /// Throughput lines.
    pub throughput: Vec<ThroughputSeries>,
}

/// The words on a bench's figure.
#[derive(Debug, Clone)]
pub struct Labels {
    /// Main title: the bench and its workload.
    pub title: String,
    /// The run's parameters (and the machine), under the title.
    pub params: String,
    /// What one latency sample is, e.g. "per append call".
    pub latency: String,
    /// What the throughput counts, e.g. "events appended".
    pub throughput: String,
    /// Unit of the throughput axis, e.g. "events/s" or "GB/s".
    pub unit: String,
    /// Counts are divided by this for the axis (1e9 for GB/s of bytes).
    pub scale: f64,
    /// What time zero is, e.g. "the first append".
    pub since: String,
}

/// A latency unit that keeps the numbers readable: ns, µs or ms, picked at the geometric middle
/// of the series' medians (so a 300 ns curve and a 15 ms one both read well in µs).
fn latency_unit(recording: &Recording) -> (&'static str, f64) {
    let medians: Vec<f64> = recording
        .latency
        .iter()
        .filter(|s| !s.hist.is_empty())
        .map(|s| s.hist.value_at_quantile(0.5).max(1) as f64)
        .collect();
    let lo = medians.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = medians.iter().copied().fold(0.0, f64::max);
    let median = if medians.is_empty() {
        0.0
    } else {
        (lo * hi).sqrt()
    };
    if median < 2_000.0 {
        ("ns", 1.0)
    } else if median < 2_000_000.0 {
        ("µs", 1e3)
    } else {
        ("ms", 1e6)
    }
}

/// Three significant digits (`0.000312`, `1.08`, `15.2`, `924`), large values as [`fmt_num`].
pub fn sig3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || v.abs() >= 10_000.0 {
        return fmt_num(v);
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

/// Points of the percentile curve, dense in the tail, up to the last quantile the sample size
/// resolves (1 - 1/count), where the curve ends at the maximum; values divided by `div`.
pub fn percentile_curve(h: &Histogram<u64>, div: f64) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let last = 1.0 - 1.0 / h.len().max(2) as f64;
    let mut points = Vec::new();
    // Quantiles 1 - 10^(-k/10): evenly spaced on a "nines" axis.
    for k in 0..=60 {
        let q = 1.0 - 10f64.powf(-(k as f64) / 10.0);
        if q >= last {
            break;
        }
        points.push((q, h.value_at_quantile(q) as f64 / div));
    }
    points.push((last, h.max() as f64 / div));
    points
}

impl Recording {
    /// Two throughput lines of scenario `name` in colour `color`: what it achieved (solid,
    /// labelled `name what`) beside what was emitted (dashed).
    pub fn achieved_vs_emitted(
        &mut self,
        name: &str,
        what: &str,
        achieved: Timeline,
        emitted: Timeline,
        color: usize,
    ) {
        self.throughput.push(ThroughputSeries {
            label: format!("{name} {what}"),
            timeline: achieved,
            dashed: false,
            color,
        });
        self.throughput.push(ThroughputSeries {
            label: format!("{name} emitted"),
            timeline: emitted,
            dashed: true,
            color,
        });
    }

    /// The two-panel figure (latency percentiles, throughput over time) and its marks (median,
    /// p99 and max on each latency curve).
    pub fn figure(&self, labels: &Labels) -> (Figure, Vec<Vec<Mark>>) {
        let (unit, div) = latency_unit(self);
        let mut latency = Vec::new();
        let mut marks = Vec::new();
        for (i, s) in self.latency.iter().enumerate() {
            let h = &s.hist;
            if h.is_empty() {
                continue;
            }
            let v = |x: u64| sig3(x as f64 / div);
            latency.push(Series {
                label: format!(
                    "{}: p50 {} · p99 {} · max {} {unit}",
                    s.label,
                    v(h.value_at_quantile(0.5)),
                    v(h.value_at_quantile(0.99)),
                    v(h.max()),
                ),
                points: percentile_curve(h, div),
                color: i,
                dashed: false,
            });
            let last = 1.0 - 1.0 / h.len().max(2) as f64;
            for (name, q, v) in [
                ("median", 0.5, h.value_at_quantile(0.5)),
                ("p99", 0.99f64.min(last), h.value_at_quantile(0.99)),
                ("max", last, h.max()),
            ] {
                if name == "p99" && v == h.max() {
                    // The max's mark says it; two labels on one dot are unreadable.
                    continue;
                }
                let v = v as f64 / div;
                // Beside the dots only when few curves share the panel; the legend has them all.
                let text = self.latency.len() <= 2;
                marks.push(Mark {
                    x: q,
                    y: v,
                    label: if text {
                        format!("{name} {}", sig3(v))
                    } else {
                        String::new()
                    },
                    color: i,
                });
            }
        }
        let scale = if labels.scale > 0.0 {
            labels.scale
        } else {
            1.0
        };
        // Each line gets the bucket that draws its own run in about 60 points: a 50 ms
        // scenario and a 5 s one then both show their shape.
        let throughput: Vec<Series> = self
            .throughput
            .iter()
            .map(|s| {
                let width = bucket_ms(s.timeline.span_ms());
                Series {
                    label: format!("{} (per {width} ms)", s.label),
                    points: s
                        .timeline
                        .rates(width)
                        .into_iter()
                        .map(|(t, r)| (t, r / scale))
                        .collect(),
                    color: s.color,
                    dashed: s.dashed,
                }
            })
            .collect();
        // A peak far above the typical point (a burst of emits, a fast scenario beside a slow
        // one) would flatten everything else on a linear scale.
        let mut ys: Vec<f64> = throughput
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| *v > 0.0)
            .collect();
        ys.sort_by(f64::total_cmp);
        let spiky = match (ys.get(ys.len() / 2), ys.last()) {
            (Some(median), Some(peak)) => peak / median > 30.0,
            _ => false,
        };
        // So would lines whose mean rates are far apart (an fsync-per-event scenario beside
        // a no-fsync one).
        let means: Vec<f64> = self
            .throughput
            .iter()
            .map(|s| s.timeline.total() as f64 / s.timeline.span_ms().max(1) as f64)
            .filter(|v| *v > 0.0)
            .collect();
        let lo = means.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = means.iter().copied().fold(0.0, f64::max);
        let log = spiky || (hi > 0.0 && hi / lo > 30.0);
        let figure = Figure {
            title: labels.title.clone(),
            subtitle: labels.params.clone(),
            panels: vec![
                Panel {
                    title: format!("Latency distribution ({})", labels.latency),
                    x_label: "percentile".into(),
                    y_label: format!("latency ({unit}, log scale)"),
                    x_axis: Axis::Nines,
                    y_axis: Axis::Log10,
                    series: latency,
                },
                Panel {
                    title: format!("Throughput over time ({})", labels.throughput),
                    x_label: format!("time since {} (s)", labels.since),
                    y_label: if log {
                        format!("{} (log scale)", labels.unit)
                    } else {
                        labels.unit.clone()
                    },
                    x_axis: Axis::Linear,
                    y_axis: if log { Axis::Log10 } else { Axis::Linear },
                    series: throughput,
                },
            ],
        };
        (figure, vec![marks, Vec::new()])
    }

    /// What the plot draws, as JSON: each latency series' percentiles (ns) and each throughput
    /// line's total, mean and peak rate (per second, before the figure's scaling).
    pub fn curves(&self) -> Value {
        let latency: Vec<Value> = self
            .latency
            .iter()
            .map(|s| {
                let h = &s.hist;
                json!({
                    "series": s.label,
                    "samples": h.len(),
                    "ns": {
                        "median": h.value_at_quantile(0.5),
                        "p99": h.value_at_quantile(0.99),
                        "max": h.max(),
                    },
                })
            })
            .collect();
        let throughput: Vec<Value> = self
            .throughput
            .iter()
            .map(|s| {
                let t = &s.timeline;
                let secs = t.span_ms() as f64 / 1000.0;
                let peak = t
                    .rates(bucket_ms(t.span_ms()))
                    .into_iter()
                    .map(|p| p.1)
                    .fold(0.0, f64::max);
                json!({
                    "series": s.label,
                    "total": t.total(),
                    "secs": secs,
                    "mean_per_sec": if secs > 0.0 { t.total() as f64 / secs } else { 0.0 },
                    "peak_per_sec": peak,
                })
            })
            .collect();
        json!({ "latency": latency, "throughput": throughput })
    }
}

/// Logical CPUs of this machine (0 when unknown).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Ends a bench: writes the plot when `--plot` asked for it, then prints `body` as JSON (with
/// the shared header fields and `curves` added) or calls `human` and names the plot.
pub fn finish(
    bench: &str,
    common: &CommonArgs,
    body: impl Serialize,
    recording: &Recording,
    labels: &Labels,
    human: impl FnOnce(),
) -> anyhow::Result<()> {
    if let Some(path) = &common.plot {
        let (figure, marks) = recording.figure(labels);
        figure.write_marked(path, &marks)?;
    }
    if common.json {
        let mut value = serde_json::to_value(body).context("serialising the summary")?;
        if let Value::Object(map) = &mut value {
            map.insert("bench".into(), json!(bench));
            map.insert("cpus".into(), json!(cpus()));
            map.insert(
                "plot".into(),
                json!(common.plot.as_ref().map(|p| p.display().to_string())),
            );
            map.insert("curves".into(), recording.curves());
        }
        // A closed stdout (`| head`) is an error to report, not a panic.
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)
            .context("cannot write the summary to stdout")?;
    } else {
        human();
        if let Some(path) = &common.plot {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

/// A progress bar over `total` steps on stderr (drawn only when stderr is a terminal).
pub fn progress(total: u64, bench: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "bench {bench} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}]"
    )) {
        bar.set_style(style);
    }
    bar
}

/// A working directory: the one given, kept, or a fresh temporary one removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    remove: bool,
}

impl ScratchDir {
    /// `given`, or `$TMPDIR/trickle-relay-bench-<bench>-<pid>-<nanos>`; created either way.
    pub fn new(given: Option<&Path>, bench: &str) -> anyhow::Result<ScratchDir> {
        let (path, remove) = match given {
            Some(d) => (d.to_path_buf(), false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos();
                let name = format!("trickle-relay-bench-{bench}-{}-{nanos}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {} (pass --dir)", path.display()))?;
        Ok(ScratchDir { path, remove })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(Spread::of(vec![]), Spread::default());
    }

    #[test]
    fn three_significant_digits() {
        assert_eq!(sig3(0.000312), "0.000312");
        assert_eq!(sig3(1.0823), "1.08");
        assert_eq!(sig3(15.24), "15.2");
        assert_eq!(sig3(923.8), "924");
        assert_eq!(sig3(1951.7), "1952");
        assert_eq!(sig3(15_200.0), "15.2k");
    }

    #[test]
    fn timeline_rates_per_bucket() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0);
        for ms in 0..100u64 {
            t.record(t0 + Duration::from_millis(ms), 10);
        }
        assert_eq!(t.total(), 1000);
        let r = t.rates(50);
        assert_eq!(r.len(), 2);
        assert!((r[0].1 - 10_000.0).abs() < 1e-6, "{r:?}");
        let mut u = Timeline::new(t0);
        u.merge(&t);
        assert_eq!(u.total(), 1000);
        assert_eq!(u.span_ms(), t.span_ms());
    }

    #[test]
    fn buckets_keep_plots_readable() {
        assert_eq!(bucket_ms(50), 1);
        assert_eq!(bucket_ms(1000), 20);
        assert_eq!(bucket_ms(60_000), 1000);
    }

    #[test]
    fn a_recording_draws_two_panels_with_marks() {
        let t0 = Instant::now();
        let mut h = histogram();
        let mut tl = Timeline::new(t0);
        for i in 1..=1000u64 {
            record(&mut h, Duration::from_micros(i));
            tl.record(t0 + Duration::from_micros(i * 100), 1);
        }
        let rec = Recording {
            latency: vec![LatencySeries {
                label: "a".into(),
                hist: h,
            }],
            throughput: vec![ThroughputSeries {
                label: "a".into(),
                timeline: tl,
                dashed: false,
                color: 0,
            }],
        };
        let labels = Labels {
            title: "t".into(),
            params: "p".into(),
            latency: "per call".into(),
            throughput: "calls".into(),
            unit: "calls/s".into(),
            scale: 1.0,
            since: "the start".into(),
        };
        let (fig, marks) = rec.figure(&labels);
        assert_eq!(fig.panels.len(), 2);
        assert_eq!(marks[0].len(), 3);
        let svg = fig.to_svg_marked(&marks);
        assert!(svg.contains("median 500"), "{svg}");
        assert!(svg.contains("Throughput over time"), "{svg}");
        assert_eq!(rec.curves()["latency"][0]["samples"], 1000);
    }
}
