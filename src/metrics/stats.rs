//! Statistics for comparing methods across folds (LDM paper, Tables 1–2): one-way ANOVA, Tukey's
//! HSD (Tukey–Kramer for unequal group sizes), and the distributions behind them — the F
//! distribution through the regularised incomplete beta function, and the studentized range
//! distribution by numerical integration of its defining double integral.
//!
//! Results follow `scipy.stats.f_oneway` and `scipy.stats.tukey_hsd`: on the fixture grid the
//! studentized range sf agrees with scipy 1.17 within 4e-11 absolute (scipy integrates with
//! `epsabs=1e-11`), its ppf within 2e-11, the F sf within 3e-15. For df ≥ 100 000 scipy switches to
//! the infinite-df form (an O(1/df) approximation, 6e-8 off at df = 2.5e5); this module integrates
//! the finite-df form at every df.

use crate::error::{Error, Result};

// ---- special functions --------------------------------------------------------------------------

/// Standard normal CDF Φ(x).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2)
}

/// Standard normal upper tail 1 − Φ(x), accurate for large x.
pub fn normal_sf(x: f64) -> f64 {
    0.5 * libm::erfc(x * std::f64::consts::FRAC_1_SQRT_2)
}

fn normal_pdf(x: f64) -> f64 {
    // 1/√(2π)
    0.398_942_280_401_432_7 * (-0.5 * x * x).exp()
}

/// ln Γ(x) − ((x − ½) ln x − x + ½ ln 2π), the Stirling series; for x ≥ 10 (error < 1e-16).
fn stirling_correction(x: f64) -> f64 {
    let r = 1.0 / (x * x);
    (1.0 / 12.0
        - r * (1.0 / 360.0
            - r * (1.0 / 1260.0
                - r * (1.0 / 1680.0 - r * (1.0 / 1188.0 - r * (691.0 / 360_360.0 - r / 156.0))))))
        / x
}

/// ln B(a, b), without the cancellation of lgamma(a) + lgamma(b) − lgamma(a + b) for large
/// arguments (Stirling's series with the logarithms combined).
fn ln_beta(a: f64, b: f64) -> f64 {
    let (small, big) = if a < b { (a, b) } else { (b, a) };
    let sum = a + b;
    if small >= 10.0 {
        0.5 * (2.0 * std::f64::consts::PI).ln()
            - 0.5 * sum.ln()
            - (big - 0.5) * (small / big).ln_1p()
            + (small - 0.5) * (small / sum).ln()
            + stirling_correction(small)
            + stirling_correction(big)
            - stirling_correction(sum)
    } else if big >= 10.0 {
        // lgamma(big) − lgamma(big + small) by the same series.
        libm::lgamma(small) - (big - 0.5) * (small / big).ln_1p() - small * sum.ln()
            + small
            + stirling_correction(big)
            - stirling_correction(sum)
    } else {
        libm::lgamma(small) + libm::lgamma(big) - libm::lgamma(sum)
    }
}

/// Continued fraction of I_x(a, b) (DLMF 8.17.22) by the modified Lentz method; `x` below the
/// mean (a+1)/(a+b+2), where it converges fast.
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut f = TINY;
    let (mut c, mut d) = (f, 0.0);
    for j in 1..20_000u32 {
        let coef = if j == 1 {
            1.0
        } else {
            let step = j - 1; // d_step of DLMF: odd → −(a+m)(a+b+m)x / ((a+2m)(a+2m+1))
            let m = f64::from(step / 2);
            if step % 2 == 1 {
                -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0))
            } else {
                m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m))
            }
        };
        d = 1.0 + coef * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + coef / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    f
}

/// Regularised incomplete beta I_x(a, b) and its complement 1 − I_x(a, b), with `y = 1 − x` and
/// the logarithms of both passed separately so that both tails keep their precision.
fn beta_inc_pair(a: f64, b: f64, x: f64, y: f64, ln_x: f64, ln_y: f64) -> (f64, f64) {
    if x <= 0.0 {
        return (0.0, 1.0);
    }
    if y <= 0.0 {
        return (1.0, 0.0);
    }
    let ln_front = a * ln_x + b * ln_y - ln_beta(a, b);
    if x < (a + 1.0) / (a + b + 2.0) {
        let lower = ln_front.exp() * beta_cf(a, b, x) / a;
        (lower, 1.0 - lower)
    } else {
        let upper = ln_front.exp() * beta_cf(b, a, y) / b;
        (1.0 - upper, upper)
    }
}

/// Regularised incomplete beta function I_x(a, b) for a, b > 0, 0 ≤ x ≤ 1 (NaN outside).
pub fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if !(a > 0.0 && b > 0.0 && (0.0..=1.0).contains(&x)) {
        return f64::NAN;
    }
    beta_inc_pair(a, b, x, 1.0 - x, x.ln(), (-x).ln_1p()).0
}

/// Survival function of the F distribution with (d1, d2) degrees of freedom:
/// P(F > f) = I_{d2/(d2 + d1 f)}(d2/2, d1/2) (scipy `special.fdtrc`).
pub fn f_sf(f: f64, d1: f64, d2: f64) -> f64 {
    if f.is_nan() || !(d1 > 0.0 && d2 > 0.0) {
        return f64::NAN;
    }
    if f <= 0.0 {
        return 1.0;
    }
    if f.is_infinite() {
        return 0.0;
    }
    f_tails(f, d1, d2).0
}

/// (sf, cdf) of F(d1, d2) at 0 < f < ∞: I_x(d2/2, d1/2) with x = d2/(d2 + d1 f), the logarithms
/// of x and 1 − x taken from the ratio r = d1 f / d2 (ln x = −ln(1 + r), ln(1 − x) = ln r + ln x).
fn f_tails(f: f64, d1: f64, d2: f64) -> (f64, f64) {
    let r = d1 * f / d2;
    let ln_x = -r.ln_1p();
    beta_inc_pair(
        d2 / 2.0,
        d1 / 2.0,
        1.0 / (1.0 + r),
        r / (1.0 + r),
        ln_x,
        r.ln() + ln_x,
    )
}

/// CDF of the F distribution, 1 − `f_sf` computed from the other tail.
pub fn f_cdf(f: f64, d1: f64, d2: f64) -> f64 {
    if f.is_nan() || !(d1 > 0.0 && d2 > 0.0) {
        return f64::NAN;
    }
    if f <= 0.0 {
        return 0.0;
    }
    if f.is_infinite() {
        return 1.0;
    }
    f_tails(f, d1, d2).1
}

// ---- adaptive Gauss–Kronrod quadrature ----------------------------------------------------------

// The published constants (QUADPACK qk15), digits beyond f64 kept for comparison with the source.
/// Kronrod 15-point abscissae (non-negative half) and weights; the Gauss 7-point rule uses every
/// other abscissa (odd indices) with `G7_W`. Checked against exact monomial integrals in the tests.
#[allow(clippy::excessive_precision)]
const K15_X: [f64; 8] = [
    0.991_455_371_120_812_639_206_854_697_526_329,
    0.949_107_912_342_758_524_526_189_684_047_851,
    0.864_864_423_359_769_072_789_712_788_640_926,
    0.741_531_185_599_394_439_863_864_773_280_788,
    0.586_087_235_467_691_130_294_144_845_693_013,
    0.405_845_151_377_397_166_906_606_412_076_961,
    0.207_784_955_007_898_467_600_689_403_773_245,
    0.0,
];
#[allow(clippy::excessive_precision)]
const K15_W: [f64; 8] = [
    0.022_935_322_010_529_224_963_732_008_058_970,
    0.063_092_092_629_978_553_290_700_663_189_204,
    0.104_790_010_322_250_183_839_876_322_541_518,
    0.140_653_259_715_525_918_745_189_590_510_238,
    0.169_004_726_639_267_902_826_583_426_598_550,
    0.190_350_578_064_785_409_913_256_402_421_014,
    0.204_432_940_075_298_892_414_161_999_234_649,
    0.209_482_141_084_727_828_012_999_174_891_714,
];
#[allow(clippy::excessive_precision)]
const G7_W: [f64; 4] = [
    0.129_484_966_168_869_693_270_611_432_679_082,
    0.279_705_391_489_276_667_901_467_771_423_780,
    0.381_830_050_505_118_944_950_369_775_488_975,
    0.417_959_183_673_469_387_755_102_040_816_327,
];

/// (Kronrod estimate, error estimate) on [a, b]. The error is QUADPACK's scaling of |K15 − G7|:
/// resasc · min(1, (200 |K15 − G7| / resasc)^1.5), with resasc ≈ ∫ |f − mean f|, floored at
/// 50 ε ∫ |f| — far less pessimistic than |K15 − G7| itself for the smooth integrands here.
fn gk15(f: &impl Fn(f64) -> f64, a: f64, b: f64) -> (f64, f64) {
    let (c, h) = (0.5 * (a + b), 0.5 * (b - a));
    let fc = f(c);
    let mut values = [(0.0, 0.0); 7];
    let (mut k, mut g, mut abs) = (fc * K15_W[7], fc * G7_W[3], fc.abs() * K15_W[7]);
    for i in 0..7 {
        let dx = h * K15_X[i];
        let (lo, hi) = (f(c - dx), f(c + dx));
        values[i] = (lo, hi);
        k += K15_W[i] * (lo + hi);
        abs += K15_W[i] * (lo.abs() + hi.abs());
        if i % 2 == 1 {
            g += G7_W[i / 2] * (lo + hi);
        }
    }
    let mean = 0.5 * k;
    let mut asc = K15_W[7] * (fc - mean).abs();
    for i in 0..7 {
        asc += K15_W[i] * ((values[i].0 - mean).abs() + (values[i].1 - mean).abs());
    }
    let (k, abs, asc) = (k * h, abs * h.abs(), asc * h.abs());
    let mut err = (k - g * h).abs();
    if asc != 0.0 && err != 0.0 {
        err = asc * (200.0 * err / asc).powf(1.5).min(1.0);
    }
    if abs > f64::MIN_POSITIVE / (50.0 * f64::EPSILON) {
        err = err.max(50.0 * f64::EPSILON * abs);
    }
    (k, err)
}

/// ∫ f over [points[0], points.last()], split at `points`, bisecting the interval with the largest
/// error estimate until the total is within max(abs_tol, rel_tol·|I|) or 400 intervals exist.
fn integrate(f: impl Fn(f64) -> f64, points: &[f64], abs_tol: f64, rel_tol: f64) -> f64 {
    let mut parts: Vec<(f64, f64, f64, f64)> = points
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| {
            let (v, e) = gk15(&f, w[0], w[1]);
            (w[0], w[1], v, e)
        })
        .collect();
    loop {
        let total: f64 = parts.iter().map(|p| p.2).sum();
        let err: f64 = parts.iter().map(|p| p.3).sum();
        if err <= abs_tol.max(rel_tol * total.abs()) || parts.len() >= 400 {
            return total;
        }
        let worst = parts
            .iter()
            .enumerate()
            .max_by(|x, y| x.1 .3.total_cmp(&y.1 .3))
            .map_or(0, |(i, _)| i);
        let (a, b, _, _) = parts[worst];
        let m = 0.5 * (a + b);
        if !(m > a && m < b) {
            return total; // cannot split further in f64
        }
        let (v1, e1) = gk15(&f, a, m);
        let (v2, e2) = gk15(&f, m, b);
        parts[worst] = (a, m, v1, e1);
        parts.push((m, b, v2, e2));
    }
}

// ---- studentized range distribution ----------------------------------------------------------

/// P(R > w) for the range R of `k` independent standard normals:
/// k ∫ φ(z) [Φ(z)^(k−1) − (Φ(z) − Φ(z−w))^(k−1)] dz, written so that both the difference of the
/// powers and Φ(z) − Φ(z−w) keep their precision in the tails.
fn normal_range_sf(w: f64, k: f64) -> f64 {
    if w <= 0.0 {
        return 1.0;
    }
    let m = k - 1.0;
    let integrand = |z: f64| {
        let a = normal_cdf(z);
        if a == 0.0 {
            return 0.0;
        }
        let b = normal_cdf(z - w);
        let r = b / a;
        let ln_ratio = if r < 0.5 {
            (-r).ln_1p()
        } else {
            let diff = if z - w > 0.0 {
                normal_sf(z - w) - normal_sf(z)
            } else {
                a - b
            };
            (diff / a).ln()
        };
        k * normal_pdf(z) * (m * a.ln()).exp() * -(m * ln_ratio).exp_m1()
    };
    // The bulk lies in |z| < 10 (φ(10) ≈ 8e-23); for large w the tail mass sits around z = w/2
    // with weight ≈ e^(−(z − w/2)²), covered up to w/2 + 10.
    let mid = 0.5 * w;
    let mut points = vec![-10.0, -4.0, 0.0, 4.0, mid, 10.0f64.max(mid + 10.0)];
    points.sort_by(f64::total_cmp);
    points.dedup();
    integrate(integrand, &points, 1e-300, 1e-11).clamp(0.0, 1.0)
}

/// k > 1 and df >= 1 (false for NaN).
fn valid_shape(k: f64, df: f64) -> bool {
    k > 1.0 && df >= 1.0
}

/// Survival function P(Q > q) of the studentized range distribution with `k` groups (k > 1) and
/// `df` degrees of freedom (df ≥ 1; `f64::INFINITY` for the normal range): the integral over
/// s = √(χ²_df / df) of P(R > q s), computed on a window where the density of s exceeds e^−80 of
/// its mode and normalised by the integral of that density over the same window. NaN outside the
/// domain.
pub fn studentized_range_sf(q: f64, k: f64, df: f64) -> f64 {
    if q.is_nan() || !valid_shape(k, df) {
        return f64::NAN;
    }
    if q <= 0.0 {
        return 1.0;
    }
    if q.is_infinite() {
        return 0.0;
    }
    if df.is_infinite() {
        return normal_range_sf(q, k);
    }
    // ln density of s up to a constant, 0 at its mode s0.
    let s0 = ((df - 1.0) / df).sqrt();
    let ln_s = |s: f64| {
        if df > 1.0 {
            (df - 1.0) * (s / s0).ln()
        } else {
            0.0
        }
    };
    let ln_f = move |s: f64| ln_s(s) - 0.5 * df * (s * s - s0 * s0);
    const CUT: f64 = -80.0;
    let solve = |mut inside: f64, mut outside: f64| {
        for _ in 0..200 {
            let mid = 0.5 * (inside + outside);
            if ln_f(mid) > CUT {
                inside = mid;
            } else {
                outside = mid;
            }
        }
        outside
    };
    let hi = {
        let mut out = s0 + 1.0;
        while ln_f(out) > CUT {
            out = s0 + 2.0 * (out - s0);
        }
        solve(s0, out)
    };
    let lo = if df > 1.0 && ln_f(0.0) <= CUT {
        solve(s0, 0.0)
    } else {
        0.0
    };
    let mut points = vec![lo, hi];
    for p in [s0, 0.5 * (lo + s0), s0 + 0.25 * (hi - s0)] {
        if p > lo && p < hi {
            points.push(p);
        }
    }
    points.sort_by(f64::total_cmp);
    let mass = integrate(|s| ln_f(s).exp(), &points, 0.0, 1e-12);
    let tail = integrate(
        |s| ln_f(s).exp() * normal_range_sf(q * s, k),
        &points,
        1e-17 * mass,
        1e-11,
    );
    (tail / mass).clamp(0.0, 1.0)
}

/// CDF of the studentized range distribution, 1 − `studentized_range_sf`.
pub fn studentized_range_cdf(q: f64, k: f64, df: f64) -> f64 {
    1.0 - studentized_range_sf(q, k, df)
}

/// Quantile of the studentized range distribution: q with CDF(q) = p, 0 < p < 1, found by
/// regula falsi (Illinois) on ln P(Q > q) to a relative precision of 1e-11 in q (about the
/// accuracy of the sf itself).
pub fn studentized_range_ppf(p: f64, k: f64, df: f64) -> f64 {
    if !(p > 0.0 && p < 1.0 && valid_shape(k, df)) {
        return f64::NAN;
    }
    let target = (1.0 - p).ln();
    let h = |q: f64| studentized_range_sf(q, k, df).ln() - target;
    let (mut a, mut fa) = (0.0, -target);
    let mut b = 4.0;
    let mut fb = h(b);
    while fb > 0.0 {
        (a, fa) = (b, fb);
        b *= 2.0;
        fb = h(b);
        if b > 1e6 {
            return f64::NAN;
        }
    }
    let mut side = 0i8;
    for _ in 0..200 {
        if (b - a).abs() <= 1e-11 * b.abs() {
            break;
        }
        let c = if fa.is_finite() && fb.is_finite() && fa != fb {
            (a * fb - b * fa) / (fb - fa)
        } else {
            0.5 * (a + b)
        };
        let c = if c > a.min(b) && c < a.max(b) {
            c
        } else {
            0.5 * (a + b)
        };
        let fc = h(c);
        if fc == 0.0 {
            return c;
        }
        if (fc > 0.0) == (fa > 0.0) {
            (a, fa) = (c, fc);
            if side == -1 {
                fb *= 0.5;
            }
            side = -1;
        } else {
            (b, fb) = (c, fc);
            if side == 1 {
                fa *= 0.5;
            }
            side = 1;
        }
    }
    0.5 * (a + b)
}

// ---- tests between groups -----------------------------------------------------------------------

fn check_groups(groups: &[&[f64]], what: &str, min_size: usize) -> Result<()> {
    if groups.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} group(s); at least 2 are needed",
            groups.len()
        )));
    }
    for (g, v) in groups.iter().enumerate() {
        if v.len() < min_size {
            return Err(Error::InvalidArgument(format!(
                "{what}: group {g} has {} value(s); at least {min_size} are needed",
                v.len()
            )));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "{what}: group {g} value {i} is {}",
                v[i]
            )));
        }
    }
    Ok(())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// One-way ANOVA of k groups.
#[derive(Clone, Debug, PartialEq)]
pub struct Anova {
    /// F = (SS_between / (k − 1)) / (SS_within / (N − k)).
    pub f: f64,
    /// P(F(k − 1, N − k) > f).
    pub p_value: f64,
    pub df_between: f64,
    pub df_within: f64,
    pub ss_between: f64,
    pub ss_within: f64,
}

/// One-way ANOVA (scipy `f_oneway`, equal variances). Needs ≥ 2 groups, each non-empty, and more
/// values than groups. As scipy: when every group is constant F is +inf and p 0, unless all values
/// are equal, when F and p are NaN.
pub fn anova_oneway(groups: &[&[f64]]) -> Result<Anova> {
    check_groups(groups, "anova_oneway", 1)?;
    let k = groups.len();
    let n: usize = groups.iter().map(|g| g.len()).sum();
    if n <= k {
        return Err(Error::InvalidArgument(format!(
            "anova_oneway: {n} values in {k} groups leave no within-group degrees of freedom"
        )));
    }
    let grand = groups.iter().flat_map(|g| g.iter()).sum::<f64>() / n as f64;
    let (mut ss_between, mut ss_within) = (0.0, 0.0);
    for g in groups {
        let m = mean(g);
        ss_between += g.len() as f64 * (m - grand) * (m - grand);
        ss_within += g.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
    }
    let (df_between, df_within) = ((k - 1) as f64, (n - k) as f64);
    let constant = |g: &[f64]| g.iter().all(|&x| x == g[0]);
    let all_same = groups.iter().all(|g| g.iter().all(|&x| x == groups[0][0]));
    let (f, p_value) = if all_same {
        (f64::NAN, f64::NAN)
    } else if groups.iter().all(|g| constant(g)) {
        (f64::INFINITY, 0.0)
    } else {
        let f = (ss_between / df_between) / (ss_within / df_within);
        (f, f_sf(f, df_between, df_within))
    };
    Ok(Anova {
        f,
        p_value,
        df_between,
        df_within,
        ss_between,
        ss_within,
    })
}

/// Tukey's honestly significant difference test for all pairs of k groups (scipy `tukey_hsd`):
/// k × k row-major matrices indexed (i, j).
#[derive(Clone, Debug, PartialEq)]
pub struct TukeyHsd {
    pub means: Vec<f64>,
    pub sizes: Vec<usize>,
    /// Within-group degrees of freedom N − k.
    pub df: f64,
    /// Pooled within-group variance Σ (n_i − 1) s_i² / (N − k).
    pub mse: f64,
    /// mean_i − mean_j (scipy's `statistic`).
    pub statistic: Vec<f64>,
    /// √(mse/2 · (1/n_i + 1/n_j)) (Tukey–Kramer).
    pub std_err: Vec<f64>,
    /// Adjusted p-value P(Q_{k, N−k} > |mean_i − mean_j| / std_err).
    pub p_value: Vec<f64>,
}

impl TukeyHsd {
    pub fn k(&self) -> usize {
        self.means.len()
    }

    /// Simultaneous confidence intervals (low, high) for mean_i − mean_j at `level` (e.g. 0.95):
    /// statistic ∓ q_{level}(k, N − k) · std_err.
    pub fn confidence_interval(&self, level: f64) -> Result<(Vec<f64>, Vec<f64>)> {
        if !(level > 0.0 && level < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "tukey_hsd: confidence level {level}; expected 0 < level < 1"
            )));
        }
        let q = studentized_range_ppf(level, self.k() as f64, self.df);
        let low = self
            .statistic
            .iter()
            .zip(&self.std_err)
            .map(|(s, e)| s - q * e)
            .collect();
        let high = self
            .statistic
            .iter()
            .zip(&self.std_err)
            .map(|(s, e)| s + q * e)
            .collect();
        Ok((low, high))
    }
}

/// Tukey HSD (scipy `tukey_hsd`, equal variances): ≥ 2 groups of ≥ 2 finite values each.
pub fn tukey_hsd(groups: &[&[f64]]) -> Result<TukeyHsd> {
    check_groups(groups, "tukey_hsd", 2)?;
    let k = groups.len();
    let n: usize = groups.iter().map(|g| g.len()).sum();
    let means: Vec<f64> = groups.iter().map(|g| mean(g)).collect();
    let sizes: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let df = (n - k) as f64;
    let mse = groups
        .iter()
        .zip(&means)
        .map(|(g, m)| g.iter().map(|x| (x - m) * (x - m)).sum::<f64>())
        .sum::<f64>()
        / df;
    let mut out = TukeyHsd {
        statistic: vec![0.0; k * k],
        std_err: vec![0.0; k * k],
        p_value: vec![1.0; k * k],
        means,
        sizes,
        df,
        mse,
    };
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
        .collect();
    let diag_err = |i: usize| (mse / out.sizes[i] as f64).sqrt();
    for i in 0..k {
        out.std_err[i * k + i] = diag_err(i);
        // |0| / std_err: p 1, or NaN when mse is 0 (0/0), as scipy.
        out.p_value[i * k + i] = if mse > 0.0 { 1.0 } else { f64::NAN };
    }
    let results: Vec<(f64, f64, f64)> = crate::threads::install(|| {
        use rayon::prelude::*;
        pairs
            .par_iter()
            .map(|&(i, j)| {
                let d = out.means[i] - out.means[j];
                let se =
                    (mse / 2.0 * (1.0 / out.sizes[i] as f64 + 1.0 / out.sizes[j] as f64)).sqrt();
                let t = d.abs() / se;
                (d, se, studentized_range_sf(t, k as f64, df))
            })
            .collect()
    });
    for (&(i, j), &(d, se, p)) in pairs.iter().zip(&results) {
        out.statistic[i * k + j] = d;
        out.statistic[j * k + i] = -d;
        out.std_err[i * k + j] = se;
        out.std_err[j * k + i] = se;
        out.p_value[i * k + j] = p;
        out.p_value[j * k + i] = p;
    }
    Ok(out)
}

/// One row of a method comparison, as statsmodels' `pairwise_tukeyhsd` prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct PairComparison {
    pub group1: String,
    pub group2: String,
    /// mean(group2) − mean(group1).
    pub mean_diff: f64,
    /// Tukey-adjusted p-value.
    pub p_adj: f64,
    pub lower: f64,
    pub upper: f64,
    /// p_adj < alpha.
    pub reject: bool,
}

/// Methods compared on a per-fold metric: the ANOVA and every pair's Tukey HSD row.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodComparison {
    pub anova: Anova,
    pub tukey: TukeyHsd,
    /// Pairs (i < j) in input order.
    pub pairs: Vec<PairComparison>,
}

/// Compares methods by their per-fold values of one metric (e.g. the mAP of each of 10 folds per
/// method) with one-way ANOVA and Tukey HSD at family-wise level `alpha` — the LDM paper's Tables
/// 1–2. `names[i]` labels `values[i]`.
pub fn compare_methods(names: &[&str], values: &[&[f64]], alpha: f64) -> Result<MethodComparison> {
    if names.len() != values.len() {
        return Err(Error::Shape(format!(
            "compare_methods: {} names but {} value groups",
            names.len(),
            values.len()
        )));
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::InvalidArgument(format!(
            "compare_methods: alpha {alpha}; expected 0 < alpha < 1"
        )));
    }
    let anova = anova_oneway(values)?;
    let tukey = tukey_hsd(values)?;
    let (low, high) = tukey.confidence_interval(1.0 - alpha)?;
    let k = values.len();
    let mut pairs = Vec::new();
    for i in 0..k {
        for j in i + 1..k {
            let p = tukey.p_value[i * k + j];
            pairs.push(PairComparison {
                group1: names[i].to_string(),
                group2: names[j].to_string(),
                mean_diff: tukey.statistic[j * k + i],
                p_adj: p,
                lower: low[j * k + i],
                upper: high[j * k + i],
                reject: p < alpha,
            });
        }
    }
    Ok(MethodComparison {
        anova,
        tukey,
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kronrod_and_gauss_rules_are_exact_on_monomials() {
        for j in 0..=11 {
            let exact = 2.0 / (2 * j + 1) as f64;
            let (k, _) = gk15(&|x: f64| x.powi(2 * j), -1.0, 1.0);
            assert!((k - exact).abs() < 1e-14, "K15 x^{}: {k} vs {exact}", 2 * j);
        }
        let g7 = |p: i32| {
            G7_W[3] * 0f64.powi(p)
                + (0..3)
                    .map(|i| G7_W[i] * ((-K15_X[2 * i + 1]).powi(p) + K15_X[2 * i + 1].powi(p)))
                    .sum::<f64>()
        };
        for j in 0..=6 {
            let exact = 2.0 / (2 * j + 1) as f64;
            assert!((g7(2 * j) - exact).abs() < 1e-14, "G7 x^{}", 2 * j);
        }
        assert!(
            (g7(16) - 2.0 / 17.0).abs() > 1e-6,
            "G7 is not exact at degree 16"
        );
        // The error estimate of a non-polynomial integrand is small but not zero.
        let (v, e) = gk15(&|x: f64| x.exp(), 0.0, 1.0);
        assert!((v - (1f64.exp() - 1.0)).abs() < 1e-15 && e > 0.0 && e < 1e-13);
    }

    #[test]
    fn incomplete_beta_closed_forms() {
        // I_x(1, b) = 1 − (1 − x)^b; I_x(a, 1) = x^a; I_x(a, b) + I_{1−x}(b, a) = 1.
        for &x in &[1e-6, 0.1, 0.37, 0.5, 0.9, 0.999] {
            assert!((beta_inc(1.0, 3.5, x) - (1.0 - (1.0 - x).powf(3.5))).abs() < 1e-15);
            assert!((beta_inc(2.5, 1.0, x) - x.powf(2.5)).abs() < 1e-15);
            let s = beta_inc(3.0, 7.5, x) + beta_inc(7.5, 3.0, 1.0 - x);
            assert!((s - 1.0).abs() < 1e-14);
        }
        // F(2, d2): sf = (1 + 2f/d2)^(−d2/2).
        for &(f, d2) in &[(0.5, 3.0), (3.0, 10.0), (40.0, 25.0)] {
            let exact = (1.0f64 + 2.0 * f / d2).powf(-d2 / 2.0);
            let got = f_sf(f, 2.0, d2);
            assert!(
                (got - exact).abs() <= 1e-14 * exact.max(1e-300),
                "{got} vs {exact}"
            );
            assert!((f_cdf(f, 2.0, d2) + got - 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn studentized_range_with_two_groups_is_a_scaled_t() {
        // k = 2: Q = √2 |T_ν|, so P(Q > q) = P(F(1, ν) > q²/2); ν = ∞: erfc(q/2).
        for &df in &[1.0, 2.0, 7.0, 30.0, 1000.0, 2.5e5] {
            for &q in &[0.1, 1.0, 2.5, 5.0, 12.0] {
                let exact = f_sf(q * q / 2.0, 1.0, df);
                let got = studentized_range_sf(q, 2.0, df);
                // 1e-11: the continued fraction of I_x(ν/2, 1/2) near its mean at ν = 2.5e5 is the
                // less accurate side here (2e-12); the studentized range itself is ~1e-14 off.
                assert!(
                    (got - exact).abs() < 1e-11,
                    "df {df} q {q}: {got} vs {exact}"
                );
            }
        }
        for &q in &[0.3, 2.0, 6.0, 11.0] {
            let exact = libm::erfc(q / 2.0);
            let got = studentized_range_sf(q, 2.0, f64::INFINITY);
            assert!(
                (got - exact).abs() <= 1e-13 * exact.max(1e-20),
                "{got} {exact}"
            );
        }
    }

    #[test]
    fn ppf_inverts_sf() {
        for &(k, df) in &[(3.0, 10.0), (6.0, 54.0), (10.0, 2.0)] {
            let q = studentized_range_ppf(0.95, k, df);
            assert!(
                (studentized_range_cdf(q, k, df) - 0.95).abs() < 1e-10,
                "{k} {df} {q}"
            );
        }
    }

    #[test]
    fn anova_and_tukey_edge_cases() {
        let a = anova_oneway(&[&[1.0, 1.0], &[2.0, 2.0]]).unwrap();
        assert!(a.f.is_infinite() && a.p_value == 0.0);
        let a = anova_oneway(&[&[3.0, 3.0], &[3.0]]).unwrap();
        assert!(a.f.is_nan() && a.p_value.is_nan());
        assert!(anova_oneway(&[&[1.0, 2.0]]).is_err());
        assert!(anova_oneway(&[&[1.0], &[2.0]]).is_err());
        assert!(anova_oneway(&[&[1.0, 2.0], &[]]).is_err());
        assert!(matches!(
            anova_oneway(&[&[1.0, f64::NAN], &[2.0, 3.0]]),
            Err(Error::NonFinite(_))
        ));
        assert!(tukey_hsd(&[&[1.0, 2.0], &[3.0]]).is_err());
        // scipy tukey_hsd docstring: group means 26.28, 30.88, 26.54; p(0, 1) = 0.01444833.
        let t = tukey_hsd(&[
            &[24.5, 23.5, 26.4, 27.1, 29.9],
            &[28.4, 34.2, 29.5, 32.2, 30.1],
            &[26.1, 28.3, 24.3, 26.2, 27.8],
        ])
        .unwrap();
        assert!((t.statistic[1] - (26.28 - 30.88)).abs() < 1e-12);
        assert!((t.p_value[1] - 0.01444833).abs() < 1e-8, "{}", t.p_value[1]);
        let (low, high) = t.confidence_interval(0.95).unwrap();
        // scipy docstring: ci.low[0][1] = -8.249159, ci.high[0][1] = -0.950841.
        assert!((low[1] + 8.249159).abs() < 1e-6 && (high[1] + 0.950841).abs() < 1e-6);
    }
}
