//! Hand-written SVG line charts for the benches (no plotting dependency).
//!
//! A [`Figure`] is a title, a subtitle and panels side by side; each [`Panel`] has labelled axes
//! ([`Axis::Linear`], [`Axis::Log10`], or [`Axis::Nines`] for percentile curves: 0%, 90%, 99%,
//! 99.9%... evenly spaced) and line [`Series`] (solid or dashed, colour per series).

use std::fmt::Write as _;
use std::path::Path;

/// How values map to an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Linear, starting at zero when all values are positive.
    Linear,
    /// Logarithmic (values ≤ 0 are clamped to the smallest positive one).
    Log10,
    /// Quantiles in [0, 1] on a "nines" scale: position = -log10(1 - q).
    Nines,
}

/// One line.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text (series with an empty label get no legend entry).
    pub label: String,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Palette index.
    pub color: usize,
    /// Dashed instead of solid.
    pub dashed: bool,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// X axis label, with its unit.
    pub x_label: String,
    /// Y axis label, with its unit.
    pub y_label: String,
    /// X scale.
    pub x_axis: Axis,
    /// Y scale.
    pub y_axis: Axis,
    /// The lines.
    pub series: Vec<Series>,
}

/// A labelled dot on a panel, in data coordinates.
#[derive(Debug, Clone)]
pub struct Mark {
    /// X value.
    pub x: f64,
    /// Y value.
    pub y: f64,
    /// Text beside the dot.
    pub label: String,
    /// Palette index (the series it belongs to).
    pub color: usize,
}

/// Panels side by side under a title.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Main title.
    pub title: String,
    /// One line under the title (the configuration, the key figures).
    pub subtitle: String,
    /// The charts, left to right.
    pub panels: Vec<Panel>,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const PANEL_W: f64 = 540.0;
const PANEL_H: f64 = 400.0;
const HEADER_H: f64 = 62.0;
const MARGIN_L: f64 = 72.0;
const MARGIN_R: f64 = 20.0;
const MARGIN_T: f64 = 34.0;
const MARGIN_B: f64 = 52.0;
/// Smallest `1 - q` drawn on a nines axis (99.9999%).
const NINES_FLOOR: f64 = 1e-6;

impl Figure {
    /// The figure as an SVG document.
    pub fn to_svg(&self) -> String {
        self.to_svg_marked(&[])
    }

    /// The figure as an SVG document, with `marks[i]` drawn over panel `i`.
    pub fn to_svg_marked(&self, marks: &[Vec<Mark>]) -> String {
        let n = self.panels.len().max(1) as f64;
        let (w, h) = (PANEL_W * n, PANEL_H + HEADER_H);
        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="{cx}" y="26" text-anchor="middle" font-size="18" font-weight="bold">{title}</text>
<text x="{cx}" y="48" text-anchor="middle" font-size="12" fill="#444">{sub}</text>
"##,
            cx = w / 2.0,
            title = esc(&self.title),
            sub = esc(&self.subtitle),
        );
        for (i, panel) in self.panels.iter().enumerate() {
            let m = marks.get(i).map_or(&[][..], Vec::as_slice);
            panel.draw(&mut s, PANEL_W * i as f64, HEADER_H, m);
        }
        s.push_str("</svg>\n");
        s
    }

    /// Writes the SVG to `path`.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.to_svg())
            .map_err(|e| anyhow::anyhow!("cannot write the plot to {}: {e}", path.display()))
    }

    /// Writes the SVG, with `marks[i]` over panel `i`, to `path`.
    pub fn write_marked(&self, path: &Path, marks: &[Vec<Mark>]) -> anyhow::Result<()> {
        std::fs::write(path, self.to_svg_marked(marks))
            .map_err(|e| anyhow::anyhow!("cannot write the plot to {}: {e}", path.display()))
    }
}

/// A value mapped onto an axis's (linear) drawing scale.
fn forward(axis: Axis, v: f64) -> f64 {
    match axis {
        Axis::Linear => v,
        Axis::Log10 => v.max(f64::MIN_POSITIVE).log10(),
        Axis::Nines => -(1.0 - v).max(NINES_FLOOR).log10(),
    }
}

/// The drawn range `[lo, hi]` of an axis, and its ticks as `(position, label)`.
fn scale(axis: Axis, values: &[f64]) -> ((f64, f64), Vec<(f64, String)>) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    match axis {
        Axis::Linear => {
            if lo > 0.0 {
                lo = 0.0;
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 6.0);
            let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
            let mut ticks = Vec::new();
            let mut t = lo;
            while t <= hi + step * 0.01 {
                ticks.push((t, fmt_num(t)));
                t += step;
            }
            ((lo, hi), ticks)
        }
        Axis::Log10 => {
            let positive: Vec<f64> = finite.iter().copied().filter(|v| *v > 0.0).collect();
            let lo_v = positive.iter().copied().fold(f64::INFINITY, f64::min);
            let hi_v = positive.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (lo_v, hi_v) = if lo_v.is_finite() {
                (lo_v, hi_v)
            } else {
                (1.0, 10.0)
            };
            let (lo, mut hi) = (lo_v.log10().floor(), hi_v.log10().ceil());
            if hi <= lo {
                hi = lo + 1.0;
            }
            let mults: &[f64] = if hi - lo <= 3.0 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut ticks = Vec::new();
            let mut e = lo;
            while e <= hi {
                for m in mults {
                    let v = m * 10f64.powf(e);
                    let p = v.log10();
                    if p <= hi + 1e-9 {
                        ticks.push((p, fmt_num(v)));
                    }
                }
                e += 1.0;
            }
            ((lo, hi), ticks)
        }
        Axis::Nines => {
            let top = finite
                .iter()
                .map(|&q| forward(Axis::Nines, q))
                .fold(1.0, f64::max)
                .ceil();
            let ticks = (0..=top as usize)
                .map(|k| {
                    let label = match k {
                        0 => "0%".to_string(),
                        1 => "90%".to_string(),
                        2 => "99%".to_string(),
                        k => format!("99.{}%", "9".repeat(k - 2)),
                    };
                    (k as f64, label)
                })
                .collect();
            ((0.0, top), ticks)
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// A short label: `1.5M`, `250k`, `12`, `0.35`.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = if x != 0.0 && x.abs() < 0.001 {
        // Log axes reach far below 1: "1e-4", not "0".
        format!("{x:.0e}")
    } else if x == x.trunc() {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        let t = format!("{x:.3}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    format!("{text}{suffix}")
}

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Panel {
    fn draw(&self, s: &mut String, x0: f64, y0: f64, marks: &[Mark]) {
        let (px, py) = (x0 + MARGIN_L, y0 + MARGIN_T);
        let (pw, ph) = (PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B);
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|se| se.points.iter().map(|p| p.0))
            .collect();
        let ys: Vec<f64> = self
            .series
            .iter()
            .flat_map(|se| se.points.iter().map(|p| p.1))
            .collect();
        let ((xlo, xhi), xticks) = scale(self.x_axis, &xs);
        let ((ylo, yhi), yticks) = scale(self.y_axis, &ys);
        let map_x = |v: f64| px + (forward(self.x_axis, v) - xlo) / (xhi - xlo) * pw;
        // Clamped to the frame: a zero on a log axis sits on the bottom edge, not far below it.
        let map_y = |v: f64| {
            (py + ph - (forward(self.y_axis, v) - ylo) / (yhi - ylo) * ph).clamp(py, py + ph)
        };
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"##,
            px + pw / 2.0,
            y0 + 20.0,
            esc(&self.title)
        );
        let _ = writeln!(
            s,
            r##"<rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        for (t, label) in &xticks {
            let x = px + (t - xlo) / (xhi - xlo) * pw;
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{py}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"##,
                py + ph,
                py + ph + 15.0,
                esc(label)
            );
        }
        for (t, label) in &yticks {
            let y = py + ph - (t - ylo) / (yhi - ylo) * ph;
            let _ = writeln!(
                s,
                r##"<line x1="{px}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
                px + pw,
                px - 5.0,
                y + 4.0,
                esc(label)
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="12">{}</text>"##,
            px + pw / 2.0,
            py + ph + 36.0,
            esc(&self.x_label)
        );
        let (lx, ly) = (x0 + 16.0, py + ph / 2.0);
        let _ = writeln!(
            s,
            r##"<text x="{lx}" y="{ly}" text-anchor="middle" font-size="12" transform="rotate(-90 {lx} {ly})">{}</text>"##,
            esc(&self.y_label)
        );
        for se in &self.series {
            let points: Vec<String> = se
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", map_x(x), map_y(y)))
                .collect();
            if points.is_empty() {
                continue;
            }
            if let [one] = points.as_slice() {
                // A line of one point would draw nothing.
                let (x, y) = one.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(
                    s,
                    r##"<circle cx="{x}" cy="{y}" r="2.5" fill="{}"/>"##,
                    PALETTE[se.color % PALETTE.len()]
                );
                continue;
            }
            let _ = writeln!(
                s,
                r##"<polyline fill="none" stroke="{}" stroke-width="1.6"{} points="{}"/>"##,
                PALETTE[se.color % PALETTE.len()],
                if se.dashed {
                    r#" stroke-dasharray="5,3""#
                } else {
                    ""
                },
                points.join(" ")
            );
        }
        for m in marks {
            if !(m.x.is_finite() && m.y.is_finite()) {
                continue;
            }
            let (x, y) = (map_x(m.x), map_y(m.y));
            // Labels go left of the dot (marks sit on rising curves, towards the right edge),
            // below it when the dot is at the top of the frame.
            let ty = if y - py < 16.0 { y + 14.0 } else { y - 5.0 };
            let _ = writeln!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{c}" stroke="white"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10" fill="{c}">{}</text>"##,
                x - 5.0,
                ty,
                esc(&m.label),
                c = PALETTE[m.color % PALETTE.len()],
            );
        }
        let mut seen: Vec<&str> = Vec::new();
        for se in &self.series {
            if !se.label.is_empty() && !seen.contains(&se.label.as_str()) {
                seen.push(&se.label);
            }
        }
        if seen.is_empty() {
            return;
        }
        let widest = seen.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64;
        let (lw, lh) = (34.0 + widest * 6.2, 15.0 * seen.len() as f64 + 6.0);
        // The legend goes in the corner that hides the fewest points (top left on a tie).
        let drawn: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|se| {
                se.points
                    .windows(2)
                    .flat_map(|w| [w[0], w[1], mid(w[0], w[1])])
            })
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| (map_x(x), map_y(y)))
            .collect();
        let corners = [
            (px + 4.0, py + 4.0),
            (px + pw - 4.0 - lw, py + 4.0),
            (px + pw - 4.0 - lw, py + ph - 4.0 - lh),
            (px + 4.0, py + ph - 4.0 - lh),
        ];
        let hidden = |&(lx, ly): &(f64, f64)| {
            drawn
                .iter()
                .filter(|(x, y)| *x >= lx && *x <= lx + lw && *y >= ly && *y <= ly + lh)
                .count()
        };
        let (lx, ly) = corners
            .iter()
            .copied()
            .min_by_key(|c| hidden(c))
            .unwrap_or(corners[0]);
        // A light backdrop keeps the legend readable over the lines.
        let _ = writeln!(
            s,
            r##"<rect x="{lx:.1}" y="{ly:.1}" width="{lw:.1}" height="{lh}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##,
        );
        seen.clear();
        for se in &self.series {
            if se.label.is_empty() || seen.contains(&se.label.as_str()) {
                continue;
            }
            let y = ly + 10.0 + 15.0 * seen.len() as f64;
            seen.push(&se.label);
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2.5"{}/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"##,
                lx + 4.0,
                lx + 24.0,
                PALETTE[se.color % PALETTE.len()],
                if se.dashed {
                    r#" stroke-dasharray="5,3""#
                } else {
                    ""
                },
                lx + 29.0,
                y + 4.0,
                esc(&se.label)
            );
        }
    }
}

/// The midpoint of a segment (so a long straight segment still counts as hidden by a legend).
fn mid(a: (f64, f64), b: (f64, f64)) -> (f64, f64) {
    ((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short() {
        assert_eq!(fmt_num(1_500_000.0), "1.5M");
        assert_eq!(fmt_num(250_000.0), "250k");
        assert_eq!(fmt_num(12.0), "12");
        assert_eq!(fmt_num(0.35), "0.35");
        assert_eq!(fmt_num(0.0001), "1e-4");
    }

    #[test]
    fn nines_axis_labels_percentiles() {
        let (_, ticks) = scale(Axis::Nines, &[0.0, 0.5, 0.999]);
        let labels: Vec<_> = ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%"]);
    }

    #[test]
    fn a_figure_is_an_svg_with_its_titles() {
        let fig = Figure {
            title: "T <1>".into(),
            subtitle: "sub".into(),
            panels: vec![Panel {
                title: "p".into(),
                x_label: "time (s)".into(),
                y_label: "events/s".into(),
                x_axis: Axis::Linear,
                y_axis: Axis::Log10,
                series: vec![Series {
                    label: "run 1".into(),
                    points: vec![(0.0, 1.0), (1.0, 100.0)],
                    color: 0,
                    dashed: false,
                }],
            }],
        };
        let svg = fig.to_svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("T &lt;1&gt;"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("events/s"));
    }
}
