//! Cosine similarity without an N × N matrix: rows are L2-normalised once, then a block of query
//! rows × all N rows is one GEMM (memory O(block × N)); blocks run in parallel and every metric
//! consumes them as they come. Also the exact percentile of a stream of pair similarities that is
//! too large to hold (histogram passes, then the one bin that holds the order statistic).

use crate::error::{Error, Result};
use rayon::prelude::*;

/// Progress callback: `(done, total)` in rows; return false to cancel (the call then returns
/// `Error::Cancelled`). Called on the calling thread between waves of blocks.
pub type Progress<'a> = Option<&'a mut dyn FnMut(usize, usize) -> bool>;

/// Profiles prepared for cosine similarity: each row divided by its L2 norm. A row of zeros stays
/// zero, so its similarity to everything is 0 (scikit-learn's `cosine_similarity` convention).
#[derive(Clone, Debug)]
pub struct CosineSimilarity {
    unit: Vec<f64>,
    n: usize,
    d: usize,
}

/// Bytes of similarities one block may hold (the block-row count adapts to N).
const BLOCK_BYTES: usize = 32 << 20;

impl CosineSimilarity {
    /// From `n` profiles of `d` features, row-major `x` (n × d). Errors: a length that is not
    /// n × d (Shape), a NaN/inf entry (NonFinite, naming its row and column).
    pub fn new(x: &[f64], n: usize, d: usize) -> Result<Self> {
        let len = n
            .checked_mul(d)
            .ok_or_else(|| Error::Shape(format!("profiles: {n} x {d} overflows")))?;
        if x.len() != len {
            return Err(Error::Shape(format!(
                "profiles: {} values for {n} rows x {d} features (expected {len})",
                x.len()
            )));
        }
        if d == 0 && n > 0 {
            return Err(Error::Shape("profiles have no features (d = 0)".into()));
        }
        if let Some(i) = x.par_iter().position_first(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "profiles[{}, {}] = {} (row {}, feature {})",
                i / d,
                i % d,
                x[i],
                i / d,
                i % d
            )));
        }
        let mut unit = x.to_vec();
        crate::threads::install(|| {
            unit.par_chunks_mut(d.max(1)).for_each(|row| {
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                if norm > 0.0 {
                    row.iter_mut().for_each(|v| *v /= norm);
                }
            })
        });
        Ok(CosineSimilarity { unit, n, d })
    }

    /// Number of profiles.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of features.
    pub fn d(&self) -> usize {
        self.d
    }

    /// The L2-normalised rows (n × d).
    pub fn unit_rows(&self) -> &[f64] {
        &self.unit
    }

    /// Similarities of the profiles `rows` to all N profiles into `out` (rows.len() × N,
    /// row-major). Panics if `out` is too small or a row index is out of range (callers check).
    pub fn rows_into(&self, rows: &[usize], out: &mut [f64]) {
        let (m, n, d) = (rows.len(), self.n, self.d);
        assert!(out.len() >= m * n, "similarity block buffer too small");
        if m == 0 || n == 0 {
            return;
        }
        let mut lhs = Vec::with_capacity(m * d);
        for &r in rows {
            lhs.extend_from_slice(&self.unit[r * d..(r + 1) * d]);
        }
        // SAFETY: dst is m × n row-major inside `out` (checked above); lhs is m × d row-major;
        // rhs is the unit matrix read as its transpose (d × n: element (k, j) at j·d + k), all
        // indices < n·d = unit.len(). No aliasing: out is &mut, the others are shared.
        unsafe {
            gemm::gemm(
                m,
                n,
                d,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                d as isize,
                self.unit.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// Rows per block for `rows` query rows: at most ~32 MiB of similarities per block, and enough
    /// blocks to keep every thread busy.
    pub fn block_rows(&self, rows: usize, requested: usize) -> usize {
        if requested > 0 {
            return requested;
        }
        let by_memory = (BLOCK_BYTES / (8 * self.n.max(1))).max(8);
        let by_threads = rows
            .div_ceil(4 * crate::threads::num_threads().max(1))
            .max(16);
        by_memory.min(by_threads).clamp(1, 1024)
    }

    /// Runs `work(block_rows, similarities)` on blocks of `rows` (similarities: block × N,
    /// row-major), in parallel, and hands the results to `sink` on the calling thread in block
    /// order, wave by wave (so at most a wave of results is alive at once). `progress` sees rows
    /// done as `offset + done` of `total`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_each_block<T: Send>(
        &self,
        rows: &[usize],
        block_rows: usize,
        progress: &mut Progress,
        offset: usize,
        total: usize,
        work: impl Fn(&[usize], &[f64]) -> T + Sync,
        mut sink: impl FnMut(T),
    ) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.n) {
            return Err(Error::Internal(format!(
                "row {bad} out of range {}",
                self.n
            )));
        }
        let b = self.block_rows(rows.len(), block_rows);
        let blocks: Vec<&[usize]> = rows.chunks(b).collect();
        let wave = 4 * crate::threads::num_threads().max(1);
        let mut done = 0usize;
        for group in blocks.chunks(wave) {
            let results: Vec<T> = crate::threads::install(|| {
                group
                    .par_iter()
                    .map(|blk| {
                        let mut sims = vec![0.0f64; blk.len() * self.n];
                        self.rows_into(blk, &mut sims);
                        work(blk, &sims)
                    })
                    .collect()
            });
            results.into_iter().for_each(&mut sink);
            done += group.iter().map(|g| g.len()).sum::<usize>();
            if let Some(p) = progress.as_mut() {
                if !p(offset + done, total) {
                    return Err(Error::Cancelled);
                }
            }
        }
        Ok(())
    }
}

/// numpy's default ("linear") percentile: the two order statistics it interpolates between
/// (0-based ranks in ascending order) and the weight, for `m` values and percentile `pct` in
/// [0, 100].
pub(crate) fn percentile_ranks(m: u64, pct: f64) -> (u64, u64, f64) {
    let q = pct / 100.0;
    let virt = (m - 1) as f64 * q;
    if virt >= (m - 1) as f64 {
        return (m - 1, m - 1, 0.0);
    }
    let prev = virt.floor();
    (prev as u64, prev as u64 + 1, virt - prev)
}

/// numpy's `_lerp`: a + (b − a)·t, computed from b's side when t ≥ 0.5.
pub(crate) fn lerp_numpy(a: f64, b: f64, t: f64) -> f64 {
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// `np.percentile(values, pct)` (linear interpolation); reorders `values`. NaN if empty.
pub fn percentile_linear(values: &mut [f64], pct: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let (lo, hi, t) = percentile_ranks(values.len() as u64, pct);
    let (lo, hi) = (lo as usize, hi as usize);
    let (_, a, rest) = values.select_nth_unstable_by(lo, f64::total_cmp);
    let a = *a;
    let b = if hi == lo {
        a
    } else {
        rest.iter().copied().fold(f64::INFINITY, f64::min)
    };
    lerp_numpy(a, b, t)
}

/// Checks a percentile argument.
pub(crate) fn check_percentile(pct: f64, what: &str) -> Result<()> {
    if pct.is_finite() && (0.0..=100.0).contains(&pct) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} is {pct}; expected a number in [0, 100]"
        )))
    }
}

/// Counts of the values of each class above, and at or below, a threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pub above: [u64; 2],
    pub at_or_below: [u64; 2],
}

/// A stream of pair similarities: each row of `rows` yields values tagged with a class (0 or 1)
/// through `visit(row, similarities_of_row, emit)`.
pub(crate) struct PairStream<'a, V> {
    pub sim: &'a CosineSimilarity,
    pub rows: &'a [usize],
    pub block_rows: usize,
    pub visit: V,
}

/// Values held in memory at once when selecting an order statistic (64 MiB).
const COLLECT_CAP: u64 = 1 << 23;
const BINS: usize = 1 << 16;

impl<V> PairStream<'_, V>
where
    V: Fn(usize, &[f64], &mut dyn FnMut(f64, usize)) + Sync,
{
    fn pass<A: Send>(
        &self,
        progress: &mut Progress,
        pass: &mut usize,
        passes: &mut usize,
        init: impl Fn() -> A + Sync,
        add: impl Fn(&mut A, f64, usize) + Sync,
        mut merge: impl FnMut(A),
    ) -> Result<()> {
        let n = self.rows.len();
        let offset = *pass * n;
        *pass += 1;
        *passes = (*passes).max(*pass);
        let total = *passes * n;
        self.sim.for_each_block(
            self.rows,
            self.block_rows,
            progress,
            offset,
            total,
            |blk, sims| {
                let mut acc = init();
                for (i, &r) in blk.iter().enumerate() {
                    let row = &sims[i * self.sim.n()..(i + 1) * self.sim.n()];
                    (self.visit)(r, row, &mut |v, c| add(&mut acc, v, c));
                }
                acc
            },
            &mut merge,
        )
    }

    /// numpy-linear percentile `pct` of the values whose class is selected in `selected`, and the
    /// counts of every class above / at or below it. Exact, in memory O(block × N + 2^23): one pass
    /// when the stream holds at most `expected_total` ≤ 2^23 values, else a histogram pass, a pass
    /// collecting the bin that holds each needed order statistic (more if a bin is too full) and
    /// a counting pass. Returns NaN and zero counts when no value is selected.
    pub fn percentile_and_counts(
        &self,
        selected: [bool; 2],
        pct: f64,
        expected_total: u64,
        progress: &mut Progress,
    ) -> Result<(f64, ClassCounts)> {
        self.percentile_and_counts_capped(selected, pct, expected_total, COLLECT_CAP, progress)
    }

    fn percentile_and_counts_capped(
        &self,
        selected: [bool; 2],
        pct: f64,
        expected_total: u64,
        cap: u64,
        progress: &mut Progress,
    ) -> Result<(f64, ClassCounts)> {
        let (mut pass, mut passes) = (0usize, if expected_total <= cap { 1 } else { 3 });
        if expected_total <= cap {
            let mut all: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            self.pass(
                progress,
                &mut pass,
                &mut passes,
                || [Vec::new(), Vec::new()],
                |acc: &mut [Vec<f64>; 2], v, c| acc[c].push(v),
                |acc| {
                    let [a, b] = acc;
                    all[0].extend(a);
                    all[1].extend(b);
                },
            )?;
            let mut sel: Vec<f64> = (0..2)
                .filter(|&c| selected[c])
                .flat_map(|c| all[c].iter().copied())
                .collect();
            let t = percentile_linear(&mut sel, pct);
            let mut counts = ClassCounts::default();
            if !t.is_nan() {
                for (c, values) in all.iter().enumerate() {
                    let above = values.iter().filter(|&&v| v > t).count() as u64;
                    counts.above[c] = above;
                    counts.at_or_below[c] = values.len() as u64 - above;
                }
            }
            return Ok((t, counts));
        }

        // Pass 1: histogram of the selected values over [-1 - ε, 1 + ε] (cosines; values outside
        // land in the edge bins), with each bin's min and max.
        let (lo, hi) = (-1.0 - 1e-9, 1.0 + 1e-9);
        let scale = BINS as f64 / (hi - lo);
        let bin_of = move |v: f64| (((v - lo) * scale).max(0.0) as usize).min(BINS - 1);
        struct Hist {
            count: Vec<u64>,
            min: Vec<f64>,
            max: Vec<f64>,
        }
        let new_hist = || Hist {
            count: vec![0; BINS],
            min: vec![f64::INFINITY; BINS],
            max: vec![f64::NEG_INFINITY; BINS],
        };
        let mut hist = new_hist();
        self.pass(
            progress,
            &mut pass,
            &mut passes,
            new_hist,
            |h: &mut Hist, v, c| {
                if selected[c] {
                    let b = bin_of(v);
                    h.count[b] += 1;
                    h.min[b] = h.min[b].min(v);
                    h.max[b] = h.max[b].max(v);
                }
            },
            |h| {
                for b in 0..BINS {
                    hist.count[b] += h.count[b];
                    hist.min[b] = hist.min[b].min(h.min[b]);
                    hist.max[b] = hist.max[b].max(h.max[b]);
                }
            },
        )?;
        let m: u64 = hist.count.iter().sum();
        if m == 0 {
            return Ok((f64::NAN, ClassCounts::default()));
        }
        let (r_lo, r_hi, gamma) = percentile_ranks(m, pct);

        // Each needed rank: the bin that holds it, then keys of that bin narrowed until few
        // enough values remain to collect.
        #[derive(Clone, Copy)]
        struct Target {
            rank: u64,
            bin: usize,
            // Selected values with bin == `bin` and key in [klo, khi]; `before` of them rank lower.
            klo: u64,
            khi: u64,
            before: u64,
            count: u64,
            value: Option<f64>,
        }
        let locate = |rank: u64| {
            let mut before = 0u64;
            for b in 0..BINS {
                if before + hist.count[b] > rank {
                    return Target {
                        rank,
                        bin: b,
                        klo: key(hist.min[b]),
                        khi: key(hist.max[b]),
                        before,
                        count: hist.count[b],
                        value: None,
                    };
                }
                before += hist.count[b];
            }
            unreachable!("rank {rank} < total {m}")
        };
        let mut targets = vec![locate(r_lo)];
        if r_hi != r_lo {
            targets.push(locate(r_hi));
        }
        while targets.iter().any(|t| t.value.is_none()) {
            for t in targets
                .iter_mut()
                .filter(|t| t.value.is_none() && t.klo == t.khi)
            {
                t.value = Some(unkey(t.klo)); // every value in the range is the same float
            }
            let open: Vec<Target> = targets
                .iter()
                .copied()
                .filter(|t| t.value.is_none())
                .collect();
            if open.is_empty() {
                break;
            }
            if open.iter().all(|t| t.count <= cap) {
                // Collect the values in each open target's range and select.
                let mut found: Vec<Vec<f64>> = vec![Vec::new(); open.len()];
                let ranges: Vec<(usize, u64, u64)> =
                    open.iter().map(|t| (t.bin, t.klo, t.khi)).collect();
                self.pass(
                    progress,
                    &mut pass,
                    &mut passes,
                    || vec![Vec::new(); ranges.len()],
                    |acc: &mut Vec<Vec<f64>>, v, c| {
                        if selected[c] {
                            let (b, k) = (bin_of(v), key(v));
                            for (i, &(tb, klo, khi)) in ranges.iter().enumerate() {
                                if b == tb && k >= klo && k <= khi {
                                    acc[i].push(v);
                                }
                            }
                        }
                    },
                    |acc| {
                        for (f, a) in found.iter_mut().zip(acc) {
                            f.extend(a);
                        }
                    },
                )?;
                for (t, mut vals) in open.into_iter().zip(found) {
                    let i = (t.rank - t.before) as usize;
                    if i >= vals.len() {
                        return Err(Error::Internal(format!(
                            "percentile: rank {} not in its bin ({} values)",
                            t.rank,
                            vals.len()
                        )));
                    }
                    let (_, v, _) = vals.select_nth_unstable_by(i, f64::total_cmp);
                    let v = *v;
                    for tt in targets.iter_mut().filter(|tt| tt.rank == t.rank) {
                        tt.value = Some(v);
                    }
                }
            } else {
                // Narrow each open target's key range with a sub-histogram over it.
                let ranges: Vec<(usize, u64, u64)> =
                    open.iter().map(|t| (t.bin, t.klo, t.khi)).collect();
                let sub = |klo: u64, khi: u64, k: u64| {
                    ((k - klo) as u128 * BINS as u128 / ((khi - klo) as u128 + 1)) as usize
                };
                let mut counts = vec![vec![0u64; BINS]; open.len()];
                self.pass(
                    progress,
                    &mut pass,
                    &mut passes,
                    || vec![vec![0u64; BINS]; ranges.len()],
                    |acc: &mut Vec<Vec<u64>>, v, c| {
                        if selected[c] {
                            let (b, k) = (bin_of(v), key(v));
                            for (i, &(tb, klo, khi)) in ranges.iter().enumerate() {
                                if b == tb && k >= klo && k <= khi {
                                    acc[i][sub(klo, khi, k)] += 1;
                                }
                            }
                        }
                    },
                    |acc| {
                        for (c, a) in counts.iter_mut().zip(acc) {
                            c.iter_mut().zip(a).for_each(|(x, y)| *x += y);
                        }
                    },
                )?;
                for (t, cnt) in open.iter().zip(counts) {
                    let mut before = t.before;
                    let width = (t.khi - t.klo) as u128 + 1;
                    for (s, &c) in cnt.iter().enumerate() {
                        if before + c > t.rank {
                            // Keys k with sub(k) == s: the smallest k ≥ klo with (k−klo)·B ≥ s·width.
                            let first =
                                |s: u128| t.klo + ((s * width).div_ceil(BINS as u128)) as u64;
                            let klo = first(s as u128);
                            let khi = first(s as u128 + 1) - 1;
                            for tt in targets.iter_mut().filter(|tt| tt.rank == t.rank) {
                                (tt.klo, tt.khi, tt.before, tt.count) =
                                    (klo, khi.min(t.khi), before, c);
                            }
                            break;
                        }
                        before += c;
                    }
                }
            }
        }
        let a = targets[0].value.unwrap_or(f64::NAN);
        let b = targets.last().and_then(|t| t.value).unwrap_or(a);
        let threshold = lerp_numpy(a, b, gamma);

        let mut counts = ClassCounts::default();
        self.pass(
            progress,
            &mut pass,
            &mut passes,
            ClassCounts::default,
            |acc: &mut ClassCounts, v, c| {
                if v > threshold {
                    acc.above[c] += 1
                } else {
                    acc.at_or_below[c] += 1
                }
            },
            |acc| {
                for c in 0..2 {
                    counts.above[c] += acc.above[c];
                    counts.at_or_below[c] += acc.at_or_below[c];
                }
            },
        )?;
        Ok((threshold, counts))
    }
}

/// Order-preserving map of finite f64 to u64.
fn key(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

fn unkey(k: u64) -> f64 {
    f64::from_bits(if k >> 63 == 1 { k & !(1 << 63) } else { !k })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn blocks_match_naive_cosine() {
        let (n, d) = (37, 11);
        let mut x = random(n, d, 1);
        x[5 * d..6 * d].fill(0.0); // a zero row: similarity 0
        let s = CosineSimilarity::new(&x, n, d).unwrap();
        let rows: Vec<usize> = (0..n).rev().collect();
        let mut seen = vec![false; n];
        s.for_each_block(
            &rows,
            4,
            &mut None,
            0,
            n,
            |blk, sims| (blk.to_vec(), sims.to_vec()),
            |(blk, sims)| {
                for (i, &r) in blk.iter().enumerate() {
                    seen[r] = true;
                    for j in 0..n {
                        let (a, b) = (&x[r * d..(r + 1) * d], &x[j * d..(j + 1) * d]);
                        let dot: f64 = a.iter().zip(b).map(|(p, q)| p * q).sum();
                        let na = a.iter().map(|v| v * v).sum::<f64>().sqrt();
                        let nb = b.iter().map(|v| v * v).sum::<f64>().sqrt();
                        let e = if na == 0.0 || nb == 0.0 {
                            0.0
                        } else {
                            dot / (na * nb)
                        };
                        assert!((sims[i * n + j] - e).abs() < 1e-14, "({r},{j})");
                    }
                }
            },
        )
        .unwrap();
        assert!(seen.iter().all(|&v| v));
    }

    #[test]
    fn bad_input_is_named() {
        let e = CosineSimilarity::new(&[1.0, f64::NAN, 0.0, 1.0], 2, 2).unwrap_err();
        assert!(
            matches!(&e, Error::NonFinite(m) if m.contains("row 0, feature 1")),
            "{e}"
        );
        assert!(matches!(
            CosineSimilarity::new(&[1.0; 5], 2, 2),
            Err(Error::Shape(_))
        ));
    }

    #[test]
    fn cancel_stops_between_waves() {
        let x = random(200, 3, 2);
        let s = CosineSimilarity::new(&x, 200, 3).unwrap();
        let rows: Vec<usize> = (0..200).collect();
        let mut calls = 0;
        let mut cb = |_: usize, _: usize| {
            calls += 1;
            false
        };
        let mut p: Progress = Some(&mut cb);
        let r = s.for_each_block(&rows, 1, &mut p, 0, 200, |_, _| (), |_| {});
        assert_eq!(r, Err(Error::Cancelled));
        assert_eq!(calls, 1);
    }

    #[test]
    fn percentile_is_numpys() {
        // np.percentile([3, 1, 4, 1, 5, 9, 2, 6], 99) = 8.79; 50 → 3.5; 0 → 1; 100 → 9
        let v = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        for (p, e) in [
            (99.0, 8.79),
            (50.0, 3.5),
            (0.0, 1.0),
            (100.0, 9.0),
            (95.0, 7.949999999999999),
        ] {
            let got = percentile_linear(&mut v.clone(), p);
            assert!((got - e).abs() < 1e-12, "{p}: {got} vs {e}");
        }
        assert!(percentile_linear(&mut [], 50.0).is_nan());
    }

    #[test]
    fn key_roundtrip_and_order() {
        let vals = [-1.5, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.3, 1.0, 2.0];
        for w in vals.windows(2) {
            assert!(key(w[0]) <= key(w[1]));
        }
        for v in vals {
            assert_eq!(unkey(key(v)).to_bits(), v.to_bits());
        }
    }

    /// The streaming (histogram + refinement) path and the in-memory path agree exactly, including
    /// heavy ties that force key refinement.
    #[test]
    fn streaming_percentile_matches_in_memory() {
        let (n, d) = (300, 4);
        let mut x = random(n, d, 3);
        // many identical rows: a large block of similarities exactly 1 and exact ties
        for i in 0..120 {
            let src = x[..d].to_vec();
            x[i * d..(i + 1) * d].copy_from_slice(&src);
        }
        let s = CosineSimilarity::new(&x, n, d).unwrap();
        let rows: Vec<usize> = (0..n).collect();
        let stream = PairStream {
            sim: &s,
            rows: &rows,
            block_rows: 32,
            visit: |r: usize, row: &[f64], emit: &mut dyn FnMut(f64, usize)| {
                for (j, &v) in row.iter().enumerate() {
                    if j > r {
                        emit(v, (r + j).is_multiple_of(3) as usize);
                    }
                }
            },
        };
        let total = (n * (n - 1) / 2) as u64;
        for (sel, pct) in [
            ([true, true], 99.0),
            ([true, false], 95.0),
            ([false, true], 50.0),
            ([true, true], 20.0),
        ] {
            let a = stream
                .percentile_and_counts(sel, pct, total, &mut None)
                .unwrap();
            // The streaming path, with a collect cap that forces key refinement of the full bins.
            for cap in [1 << 20, 50, 1] {
                let b = stream
                    .percentile_and_counts_capped(sel, pct, u64::MAX, cap, &mut None)
                    .unwrap();
                assert_eq!(a.0.to_bits(), b.0.to_bits(), "{sel:?} {pct} cap {cap}");
                assert_eq!(a.1, b.1);
            }
            let c = &a.1;
            assert_eq!(c.above.iter().chain(&c.at_or_below).sum::<u64>(), total);
        }
    }
}
