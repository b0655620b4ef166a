//! Significance: the one-sided Fisher exact test on 2 × 2 tables (exact hypergeometric tail in log
//! space, accurate for tables of billions of pairs), odds ratios with scipy's conventions,
//! Benjamini–Hochberg q-values (statsmodels `fdr_bh`), and permutation nulls of average precision
//! (copairs' null: random rankings with a fixed number of positives).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// A 2 × 2 contingency table `[[v11, v12], [v21, v22]]`: rows above / at-or-below a threshold,
/// columns same / different annotation.
pub type Table2x2 = [[u64; 2]; 2];

/// Odds ratio (v11·v22)/(v12·v21) as `scipy.stats.fisher_exact` reports it: NaN when a row or a
/// column sums to zero, +inf when v12·v21 = 0 otherwise.
pub fn odds_ratio(t: &Table2x2) -> f64 {
    if degenerate(t) {
        return f64::NAN;
    }
    let num = t[0][0] as u128 * t[1][1] as u128;
    let den = t[0][1] as u128 * t[1][0] as u128;
    if den == 0 {
        f64::INFINITY
    } else {
        num as f64 / den as f64
    }
}

/// Haldane–Anscombe odds ratio: 0.5 added to every cell, finite for every table.
pub fn odds_ratio_haldane(t: &Table2x2) -> f64 {
    let c = |v: u64| v as f64 + 0.5;
    (c(t[0][0]) * c(t[1][1])) / (c(t[0][1]) * c(t[1][0]))
}

fn degenerate(t: &Table2x2) -> bool {
    t[0][0] + t[0][1] == 0
        || t[1][0] + t[1][1] == 0
        || t[0][0] + t[1][0] == 0
        || t[0][1] + t[1][1] == 0
}

/// One-sided ("greater") Fisher exact p-value P(X ≥ v11), X hypergeometric with the table's
/// margins, as `scipy.stats.fisher_exact(t, alternative="greater")`: 1 when a row or column sums
/// to zero. Exact up to rounding: the tail is summed from its largest term outward in ratios of
/// consecutive terms, the starting term from Loader's saddle-point form of the hypergeometric pmf.
pub fn fisher_exact_greater(t: &Table2x2) -> f64 {
    if degenerate(t) {
        return 1.0;
    }
    let white = t[0][0] + t[1][0]; // same annotation
    let black = t[0][1] + t[1][1];
    let drawn = t[0][0] + t[0][1]; // above the threshold
    let x = t[0][0];
    let lo = drawn.saturating_sub(black);
    let hi = drawn.min(white);
    if x <= lo {
        return 1.0;
    }
    let total = (white + black) as f64;
    let mode = (((drawn as f64 + 1.0) * (white as f64 + 1.0)) / (total + 2.0)).floor() as u64;
    let (w, b, n) = (white as f64, black as f64, drawn as f64);
    // pmf(k + 1) / pmf(k)
    let up = |k: f64| ((w - k) * (n - k)) / ((k + 1.0) * (b - n + k + 1.0));
    if x > mode {
        // Terms decrease from x upward.
        let first = log_dhyper(x, white, black, drawn).exp();
        let (mut term, mut sum, mut k) = (1.0f64, 1.0f64, x);
        while k < hi {
            term *= up(k as f64);
            sum += term;
            k += 1;
            if term < sum * 1e-17 {
                break;
            }
        }
        (first * sum).min(1.0)
    } else {
        // P(X ≥ x) = 1 − P(X ≤ x − 1); terms decrease from x − 1 downward.
        let start = x - 1;
        let first = log_dhyper(start, white, black, drawn).exp();
        let (mut term, mut sum, mut k) = (1.0f64, 1.0f64, start);
        while k > lo {
            term /= up(k as f64 - 1.0);
            sum += term;
            k -= 1;
            if term < sum * 1e-17 {
                break;
            }
        }
        (1.0 - first * sum).clamp(0.0, 1.0)
    }
}

/// ln of the hypergeometric pmf: `x` white balls among `n` drawn from `r` white and `b` black
/// (Loader 2000, as R's dhyper: a ratio of three binomial densities).
fn log_dhyper(x: u64, r: u64, b: u64, n: u64) -> f64 {
    let total = (r + b) as f64;
    let p = n as f64 / total;
    let q = (r + b - n) as f64 / total;
    log_dbinom_raw(x as f64, r as f64, p, q) + log_dbinom_raw((n - x) as f64, b as f64, p, q)
        - log_dbinom_raw(n as f64, total, p, q)
}

/// ln of the binomial pmf of `x` in `n` trials with success probability `p` (q = 1 − p), Loader's
/// saddle-point form: accurate in relative terms for any n.
fn log_dbinom_raw(x: f64, n: f64, p: f64, q: f64) -> f64 {
    if p == 0.0 {
        return if x == 0.0 { 0.0 } else { f64::NEG_INFINITY };
    }
    if q == 0.0 {
        return if x == n { 0.0 } else { f64::NEG_INFINITY };
    }
    if x == 0.0 {
        if n == 0.0 {
            return 0.0;
        }
        return if p < 0.1 {
            -bd0(n, n * q) - n * p
        } else {
            n * q.ln()
        };
    }
    if x == n {
        return if q < 0.1 {
            -bd0(n, n * p) - n * q
        } else {
            n * p.ln()
        };
    }
    if x < 0.0 || x > n {
        return f64::NEG_INFINITY;
    }
    let lc = stirlerr(n) - stirlerr(x) - stirlerr(n - x) - bd0(x, n * p) - bd0(n - x, n * q);
    let lf = (2.0 * std::f64::consts::PI).ln() + x.ln() + (-x / n).ln_1p();
    lc - 0.5 * lf
}

/// ln(n!) − ((n + ½) ln n − n + ½ ln 2π), the error of Stirling's formula, for integer n ≥ 1.
fn stirlerr(n: f64) -> f64 {
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    if n <= 15.0 {
        // n! is exact in f64 up to 15!, so ln(n!) is correctly rounded; the absolute error of the
        // difference (~1e-14) is a relative error of the pmf.
        let fact: f64 = (2..=n as u64).map(|k| k as f64).product();
        let half_ln_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
        return fact.ln() - ((n + 0.5) * n.ln() - n + half_ln_2pi);
    }
    let nn = n * n;
    if n > 500.0 {
        (S0 - S1 / nn) / n
    } else if n > 80.0 {
        (S0 - (S1 - S2 / nn) / nn) / n
    } else if n > 35.0 {
        (S0 - (S1 - (S2 - S3 / nn) / nn) / nn) / n
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / nn) / nn) / nn) / nn) / n
    }
}

/// x ln(x / np) + np − x, without cancellation when x ≈ np.
fn bd0(x: f64, np: f64) -> f64 {
    if (x - np).abs() < 0.1 * (x + np) {
        let mut v = (x - np) / (x + np);
        let mut s = (x - np) * v;
        let mut ej = 2.0 * x * v;
        v *= v;
        for j in 1..1000 {
            ej *= v;
            let s1 = s + ej / (2 * j + 1) as f64;
            if s1 == s {
                return s1;
            }
            s = s1;
        }
        return s;
    }
    x * (x / np).ln() + np - x
}

/// Benjamini–Hochberg adjusted p-values (q-values), exactly as statsmodels
/// `multipletests(p, method="fdr_bh")`: p_(i) / (i / m), a running minimum from the largest p
/// down, capped at 1. NaN entries are not tests: they stay NaN and do not count in m.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
    let m = idx.len() as f64;
    let mut q = vec![f64::NAN; p.len()];
    let mut running = f64::INFINITY;
    for (rank, &i) in idx.iter().enumerate().rev() {
        let ecdf = (rank + 1) as f64 / m;
        running = running.min(p[i] / ecdf);
        q[i] = running.min(1.0);
    }
    q
}

/// Average precision of one ranking from the 0-based ranks of its positives in increasing order:
/// Σᵢ (i + 1) / (rankᵢ + 1) / #positives. Observed and null APs both go through this function, so
/// equal rankings give bit-identical APs and ties with the null are counted exactly.
pub fn average_precision_from_ranks(ranks: impl IntoIterator<Item = usize>) -> f64 {
    let mut sum = 0.0f64;
    let mut count = 0usize;
    for r in ranks {
        count += 1;
        sum += count as f64 / (r + 1) as f64;
    }
    sum / count as f64
}

/// Samples of one null configuration generated with one seed; chunks keep the result independent
/// of the thread count.
const NULL_CHUNK: usize = 1024;

/// Null distribution of AP for rankings of `n_total` items with `n_pos` positives placed uniformly
/// at random: `null_size` samples, sorted ascending. Deterministic in (`seed`, `n_pos`, `n_total`,
/// `null_size`), whatever the thread count or the other configurations in the same run.
pub fn ap_null_sorted(n_pos: usize, n_total: usize, null_size: usize, seed: u64) -> Vec<f64> {
    let mut v = vec![0.0; null_size];
    v.par_chunks_mut(NULL_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| fill_null_chunk(chunk, n_pos, n_total, seed, c));
    v.sort_unstable_by(f64::total_cmp);
    v
}

fn fill_null_chunk(out: &mut [f64], n_pos: usize, n_total: usize, seed: u64, chunk: usize) {
    let key = mix(mix(mix(seed ^ 0x005E_ED0F_A7E5) ^ n_pos as u64) ^ ((n_total as u64) << 1))
        ^ chunk as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(key));
    let mut sampler = SortedSampler::new(n_total);
    for o in out.iter_mut() {
        let ranks = sampler.sample(&mut rng, n_pos);
        *o = average_precision_from_ranks(ranks.iter().map(|&r| r as usize));
    }
}

/// SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform k-subsets of 0..n in increasing order (Floyd's algorithm over a bitset that is cleared
/// after each draw; the complement is drawn when k > n/2).
struct SortedSampler {
    n: usize,
    bits: Vec<u64>,
    picked: Vec<u32>,
    out: Vec<u32>,
}

impl SortedSampler {
    fn new(n: usize) -> Self {
        SortedSampler {
            n,
            bits: vec![0; n.div_ceil(64)],
            picked: Vec::new(),
            out: Vec::new(),
        }
    }

    fn floyd(&mut self, rng: &mut ChaCha8Rng, k: usize) {
        self.picked.clear();
        for j in (self.n - k)..self.n {
            let t = rng.gen_range(0..=j);
            let v = if self.bits[t / 64] >> (t % 64) & 1 == 1 {
                j
            } else {
                t
            };
            self.bits[v / 64] |= 1 << (v % 64);
            self.picked.push(v as u32);
        }
    }

    fn sample(&mut self, rng: &mut ChaCha8Rng, k: usize) -> &[u32] {
        self.out.clear();
        if 2 * k <= self.n {
            self.floyd(rng, k);
            for &v in &self.picked {
                self.bits[v as usize / 64] = 0;
            }
            self.out.extend_from_slice(&self.picked);
            self.out.sort_unstable();
        } else {
            self.floyd(rng, self.n - k);
            for v in 0..self.n {
                if self.bits[v / 64] >> (v % 64) & 1 == 0 {
                    self.out.push(v as u32);
                }
            }
            for &v in &self.picked {
                self.bits[v as usize / 64] = 0;
            }
        }
        &self.out
    }
}

/// Permutation p-value (#null ≥ observed + 1) / (null_size + 1) against a null sorted ascending.
pub fn permutation_p_value(null_sorted: &[f64], observed: f64) -> f64 {
    let below = null_sorted.partition_point(|&v| v < observed);
    (null_sorted.len() - below + 1) as f64 / (null_sorted.len() + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_choose(n: u64, k: u64) -> f64 {
        (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum()
    }

    /// Direct sum of the hypergeometric tail for small tables (closed form).
    fn fisher_direct(t: &Table2x2) -> f64 {
        let white = t[0][0] + t[1][0];
        let black = t[0][1] + t[1][1];
        let drawn = t[0][0] + t[0][1];
        let denom = ln_choose(white + black, drawn);
        (t[0][0]..=drawn.min(white))
            .filter(|&k| drawn - k <= black)
            .map(|k| (ln_choose(white, k) + ln_choose(black, drawn - k) - denom).exp())
            .sum()
    }

    #[test]
    fn fisher_matches_direct_sum_on_small_tables() {
        let mut worst = 0.0f64;
        for a in 0..9u64 {
            for b in 0..7u64 {
                for c in 0..8u64 {
                    for d in 0..12u64 {
                        let t = [[a, b], [c, d]];
                        let p = fisher_exact_greater(&t);
                        let e = if degenerate(&t) {
                            1.0
                        } else {
                            fisher_direct(&t).min(1.0)
                        };
                        worst = worst.max((p - e).abs() / e.max(1e-300));
                    }
                }
            }
        }
        assert!(worst < 1e-12, "worst relative error {worst}");
    }

    #[test]
    fn fisher_large_table_branches_agree() {
        // Margins of a pooled table over ~10^10 pairs. Above the mode the upper tail is summed,
        // at or below it the lower tail is subtracted from 1: across the mode the two must differ
        // by exactly pmf(mode), and the tail must fall monotonically to ~1e-200.
        let (total, drawn, white) = (10_000_000_000u64, 100_000_000u64, 10_000_000u64);
        let table = |x: u64| [[x, drawn - x], [white - x, total - drawn - white + x]];
        let mode = ((drawn + 1) as f64 * (white + 1) as f64 / (total + 2) as f64).floor() as u64;
        let step = fisher_exact_greater(&table(mode)) - fisher_exact_greater(&table(mode + 1));
        let pmf = log_dhyper(mode, white, total - white, drawn).exp();
        assert!((step - pmf).abs() < 1e-13, "{step} vs {pmf}"); // two tails ~0.5, each exact to ~1e-15
        let mut prev = 1.0;
        for x in [
            mode - 3000,
            mode - 100,
            mode,
            mode + 100,
            mode + 1000,
            mode + 3000,
            mode + 10000,
        ] {
            let p = fisher_exact_greater(&table(x));
            assert!(p <= prev && p >= 0.0, "{x}: {p} > {prev}");
            prev = p;
        }
        assert!(prev > 0.0 && prev < 1e-150, "{prev}");
    }

    #[test]
    fn odds_ratio_conventions() {
        assert_eq!(odds_ratio(&[[2, 3], [4, 5]]), 10.0 / 12.0);
        assert!(odds_ratio(&[[2, 0], [4, 5]]).is_infinite());
        assert!(odds_ratio(&[[0, 0], [4, 5]]).is_nan());
        assert_eq!(odds_ratio(&[[0, 3], [4, 5]]), 0.0);
        assert_eq!(
            odds_ratio_haldane(&[[2, 0], [4, 5]]),
            2.5 * 5.5 / (0.5 * 4.5)
        );
    }

    #[test]
    fn bh_matches_hand_computation() {
        let p = [0.01, f64::NAN, 0.04, 0.03, 0.5];
        let q = benjamini_hochberg(&p);
        // m = 4: sorted 0.01, 0.03, 0.04, 0.5 → 0.04, 0.04·4/2 = 0.06 → min(0.06, 0.0533) ...
        let e = [0.04, f64::NAN, 0.04 / 0.75, 0.03 / 0.5, 0.5];
        let e = [e[0].min(e[3]).min(e[2]), e[1], e[2], e[3].min(e[2]), e[4]];
        for (a, b) in q.iter().zip(e) {
            assert!(a.is_nan() && b.is_nan() || a == &b, "{q:?} vs {e:?}");
        }
    }

    #[test]
    fn null_has_the_exact_mean_and_is_seeded() {
        // E[AP] under random ranking = (1/k) Σ_i i · E[1/(r_i+1)] has no simple closed form, but
        // for k = 1 it is H_n / n.
        let n = 50;
        let null = ap_null_sorted(1, n, 20000, 7);
        let h: f64 = (1..=n).map(|i| 1.0 / i as f64).sum::<f64>() / n as f64;
        let mean = null.iter().sum::<f64>() / null.len() as f64;
        let var: f64 = (1..=n).map(|i| (1.0 / i as f64 - h).powi(2)).sum::<f64>() / n as f64;
        assert!(
            (mean - h).abs() < 5.0 * (var / 20000.0).sqrt(),
            "{mean} vs {h}"
        );
        assert_eq!(null, ap_null_sorted(1, n, 20000, 7));
        assert_ne!(null, ap_null_sorted(1, n, 20000, 8));
        // all positives: AP = 1 always; k = n − 1 uses the complement path.
        assert!(ap_null_sorted(n, n, 10, 1).iter().all(|&v| v == 1.0));
        let dense = ap_null_sorted(n - 1, n, 3000, 1);
        let exact_mean: f64 = (0..n)
            .map(|miss| {
                let ranks = (0..n).filter(|&r| r != miss);
                average_precision_from_ranks(ranks)
            })
            .sum::<f64>()
            / n as f64;
        let m = dense.iter().sum::<f64>() / dense.len() as f64;
        assert!((m - exact_mean).abs() < 2e-3, "{m} vs {exact_mean}");
    }

    #[test]
    fn permutation_p_counts_ties_as_at_least() {
        let null = [0.1, 0.2, 0.2, 0.5];
        assert_eq!(permutation_p_value(&null, 0.2), 4.0 / 5.0);
        assert_eq!(permutation_p_value(&null, 0.6), 1.0 / 5.0);
        assert_eq!(permutation_p_value(&null, 0.0), 5.0 / 5.0);
    }
}
