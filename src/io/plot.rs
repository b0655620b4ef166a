//! Small self-contained SVG charts (no plotting dependency): line charts for the sphering λ sweep
//! (the CP-CNN paper's Fig. 6B curve) and histograms of per-query scores. Written atomically.

use super::write_atomic;
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

/// One named line of (x, y) points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart; `x_log` puts x on a log10 axis (all x must then be > 0).
#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub series: Vec<Series>,
}

const W: f64 = 640.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" tick positions (1, 2, 5 × 10^k steps) covering [lo, hi].
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e4).contains(&a) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Axis range with a little padding; a single value gets a unit-wide range around it.
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    }
}

struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (H - TOP - BOTTOM)
    }
}

fn header(svg: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        (LEFT + W - RIGHT) / 2.0,
        esc(title),
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        esc(x_label),
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        esc(y_label),
    );
}

fn axes(svg: &mut String, f: &Frame, xt: &[(f64, String)], yt: &[(f64, String)]) {
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    for (v, label) in xt {
        let x = f.px(*v);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{}" stroke="#333"/><text x="{x:.2}" y="{}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 5.0,
            H - BOTTOM + 18.0,
            esc(label)
        );
    }
    for (v, label) in yt {
        let y = f.py(*v);
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{y:.2}" x2="{LEFT}" y2="{y:.2}" stroke="#333"/><line x1="{LEFT}" y1="{y:.2}" x2="{}" y2="{y:.2}" stroke="#eee"/><text x="{}" y="{:.2}" text-anchor="end">{}</text>"##,
            LEFT - 5.0,
            W - RIGHT,
            LEFT - 8.0,
            y + 4.0,
            esc(label)
        );
    }
}

impl LineChart {
    /// The chart as an SVG document; errors on no points, non-finite values, or x ≤ 0 on a log axis.
    pub fn to_svg(&self) -> Result<String> {
        let mut all = Vec::new();
        for s in &self.series {
            for &(x, y) in &s.points {
                if !x.is_finite() || !y.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "chart {:?}: series {:?} has a non-finite point ({x}, {y})",
                        self.title, s.name
                    )));
                }
                if self.x_log && x <= 0.0 {
                    return Err(Error::InvalidArgument(format!(
                        "chart {:?}: series {:?} has x = {x} on a log axis",
                        self.title, s.name
                    )));
                }
                all.push((if self.x_log { x.log10() } else { x }, y));
            }
        }
        if all.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "chart {:?} has no points",
                self.title
            )));
        }
        let f = Frame {
            x: range(all.iter().map(|p| p.0)),
            y: range(all.iter().map(|p| p.1)),
        };
        let xt: Vec<(f64, String)> = if self.x_log {
            let (lo, hi) = (f.x.0.ceil() as i64, f.x.1.floor() as i64);
            let every = (((hi - lo) as f64 / 8.0).ceil() as i64).max(1);
            (lo..=hi)
                .filter(|k| (k - lo) % every == 0)
                .map(|k| (k as f64, format!("1e{k}")))
                .collect()
        } else {
            ticks(f.x.0, f.x.1, 6)
                .into_iter()
                .map(|v| (v, fmt_tick(v)))
                .collect()
        };
        let yt: Vec<(f64, String)> = ticks(f.y.0, f.y.1, 6)
            .into_iter()
            .map(|v| (v, fmt_tick(v)))
            .collect();
        let mut svg = String::new();
        header(&mut svg, &self.title, &self.x_label, &self.y_label);
        axes(&mut svg, &f, &xt, &yt);
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(x, y)| (f.px(if self.x_log { x.log10() } else { x }), f.py(y)))
                .collect();
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.2},{y:.2}")).collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{x:.2}" cy="{y:.2}" r="3" fill="{color}"/>"#
                );
            }
            let ly = TOP + 10.0 + 18.0 * i as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                W - RIGHT + 10.0,
                W - RIGHT + 30.0,
                W - RIGHT + 35.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        Ok(svg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_svg()?.as_bytes())
    }
}

/// A histogram of `values` (NaN skipped) in `bins` equal bins over [lo, hi].
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub title: String,
    pub x_label: String,
    pub values: Vec<f64>,
    pub bins: usize,
    pub lo: f64,
    pub hi: f64,
}

impl Histogram {
    /// Counts per bin; the last bin includes `hi`; values outside [lo, hi] are not counted.
    pub fn counts(&self) -> Result<Vec<usize>> {
        if self.bins == 0 || !(self.lo.is_finite() && self.hi.is_finite() && self.lo < self.hi) {
            return Err(Error::InvalidArgument(format!(
                "histogram {:?}: needs bins > 0 and finite lo < hi (got {} bins over [{}, {}])",
                self.title, self.bins, self.lo, self.hi
            )));
        }
        let mut c = vec![0usize; self.bins];
        let w = (self.hi - self.lo) / self.bins as f64;
        for &v in self.values.iter().filter(|v| !v.is_nan()) {
            if v < self.lo || v > self.hi {
                continue;
            }
            let b = (((v - self.lo) / w) as usize).min(self.bins - 1);
            c[b] += 1;
        }
        Ok(c)
    }

    pub fn to_svg(&self) -> Result<String> {
        let c = self.counts()?;
        let max = c.iter().copied().max().unwrap_or(0).max(1) as f64;
        let f = Frame {
            x: (self.lo, self.hi),
            y: (0.0, max * 1.05),
        };
        let xt: Vec<(f64, String)> = ticks(self.lo, self.hi, 6)
            .into_iter()
            .map(|v| (v, fmt_tick(v)))
            .collect();
        let yt: Vec<(f64, String)> = ticks(0.0, max * 1.05, 5)
            .into_iter()
            .filter(|v| v.fract() == 0.0)
            .map(|v| (v, fmt_tick(v)))
            .collect();
        let mut svg = String::new();
        header(&mut svg, &self.title, &self.x_label, "count");
        axes(&mut svg, &f, &xt, &yt);
        let w = (self.hi - self.lo) / self.bins as f64;
        for (i, &n) in c.iter().enumerate() {
            let x0 = f.px(self.lo + i as f64 * w);
            let x1 = f.px(self.lo + (i + 1) as f64 * w);
            let y = f.py(n as f64);
            let _ = writeln!(
                svg,
                r##"<rect x="{x0:.2}" y="{y:.2}" width="{:.2}" height="{:.2}" fill="#1f77b4" stroke="white"/>"##,
                (x1 - x0).max(0.0),
                (f.py(0.0) - y).max(0.0)
            );
        }
        svg.push_str("</svg>\n");
        Ok(svg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_svg()?.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circles(svg: &str) -> Vec<(f64, f64)> {
        svg.lines()
            .filter(|l| l.starts_with("<circle"))
            .map(|l| {
                let get = |k: &str| -> f64 {
                    let s = &l[l.find(&format!("{k}=\"")).unwrap() + k.len() + 2..];
                    s[..s.find('"').unwrap()].parse().unwrap()
                };
                (get("cx"), get("cy"))
            })
            .collect()
    }

    #[test]
    fn line_chart_maps_points_monotonically_and_log_spaces_x() {
        let c = LineChart {
            title: "mAP vs λ <sweep>".into(),
            x_label: "λ".into(),
            y_label: "mAP".into(),
            x_log: true,
            series: vec![Series {
                name: "ZCA".into(),
                points: vec![(1e-6, 0.2), (1e-4, 0.5), (1e-2, 0.4)],
            }],
        };
        let svg = c.to_svg().unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("&lt;sweep&gt;"), "title must be escaped");
        let p = circles(&svg);
        assert_eq!(p.len(), 3);
        // Equal steps in log10 x → equal pixel steps; higher y → smaller pixel y.
        assert!(((p[1].0 - p[0].0) - (p[2].0 - p[1].0)).abs() < 0.02);
        assert!(p[1].1 < p[2].1 && p[2].1 < p[0].1);
        // Every point lies inside the plot frame.
        for (x, y) in p {
            assert!((LEFT..=W - RIGHT).contains(&x) && (TOP..=H - BOTTOM).contains(&y));
        }
    }

    #[test]
    fn line_chart_rejects_bad_points() {
        let mut c = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            series: vec![Series {
                name: "s".into(),
                points: vec![(0.0, 1.0)],
            }],
        };
        assert!(matches!(c.to_svg(), Err(Error::InvalidArgument(_))));
        c.series[0].points = vec![(1.0, f64::NAN)];
        assert!(matches!(c.to_svg(), Err(Error::NonFinite(_))));
        c.series[0].points.clear();
        assert!(c.to_svg().is_err());
    }

    #[test]
    fn histogram_counts_match_numpy_convention() {
        // numpy.histogram([0, .1, .5, .5, .99, 1, 1.5, nan], bins=4, range=(0, 1)) → [2, 0, 2, 2]
        let h = Histogram {
            title: "AP".into(),
            x_label: "AP".into(),
            values: vec![0.0, 0.1, 0.5, 0.5, 0.99, 1.0, 1.5, f64::NAN],
            bins: 4,
            lo: 0.0,
            hi: 1.0,
        };
        assert_eq!(h.counts().unwrap(), vec![2, 0, 2, 2]);
        assert_eq!(h.to_svg().unwrap().matches("<rect x=").count(), 1 + 4);
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(
            ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(fmt_tick(0.6000000000000001), "0.6");
        assert_eq!(fmt_tick(1e-5), "1e-5");
    }
}
