//! Harmony batch integration (Korsunsky et al. 2019, Nat Methods 16:1289) as harmonypy 2.1.0 runs
//! it: its C++ backend follows R harmony2, and so does this module, step by step, in f64 (harmonypy
//! computes in f32).
//!
//! Input: an n × d embedding (cells × PCs, row-major) and one or more categorical batch columns.
//! Output: the corrected n × d embedding (harmonypy's `Z_corr`, not cosine-normalised).
//!
//! 1. Cosine-normalise the cells (`Z_cos`). Initial centroids Y (K × d): K random cells, then for
//!    centroid i a cell drawn with probability ∝ |2(1 − y_i·z)| (R harmony2's draw, which harmonypy
//!    makes as an exponential race), then 10 Lloyd iterations; Y normalised.
//! 2. `dist = 2(1 − Z_cos Yᵀ)`, `R = softmax_k(−dist/σ)`; `E(b,k) = Pr_b Σ_cells R`, `O(b,k) = Σ_{cells
//!    of b} R`.
//! 3. Each Harmony iteration: `max_iter_kmeans` passes over the cells in a random order, in
//!    `ceil(1/block_size)` blocks: take the block out of O and E, reassign its cells with
//!    `logit = −dist/σ + Σ_batches θ_b (ln(2E+1) − ln(O+E+1))` (harmony2's diversity penalty), put it
//!    back. The k-means passes stop early when the sum of the last 3 objectives changes by less than
//!    `epsilon_cluster` relative to the 3 before. Y is not updated by the passes.
//! 4. Per cluster, a ridge regression of the original embedding on [1, one-hot of the kept batches]
//!    weighted by R (intercept unpenalised; batch penalty λ, or α·E(b,k) when λ is estimated); the
//!    intercept becomes the centroid, and `Z_corr = Z − Σ_batches R M_b`. Batches whose mean
//!    assignment to the cluster is ≤ `batch_prop_cutoff` are left out of that cluster's regression.
//! 5. Stop when the objective after clustering decreased by less than `epsilon_harmony` relative to
//!    the previous iteration's. Later iterations re-normalise `Z_corr`, recompute dist and reset R
//!    without the penalty before the passes.
//!
//! Objective (harmonypy): `2000/n · (Σ R·dist + Σ σ R ln R + Σ_{b,k} σ_k θ_b O ln((O+E+1)/(2E+1)))`.
//!
//! Work and memory: each k-means pass costs O(n·K·d) (the distances are recomputed per block by
//! GEMM rather than stored) plus n·K softmax terms (a vectorised exp); memory is R (n × K) and three
//! n × d copies of the embedding, all f64. On 2 cores, 100,000 cells × 30 PCs, K = 100, 5 iterations:
//! ~1.2–1.5× faster than harmonypy 2.1.0's f32 C++ backend (benches/harmony.py).
//!
//! Deterministic for a seed (ChaCha8), and the same for any number of threads: every parallel
//! reduction runs over fixed chunks combined in order. The random draws are this library's own, so a
//! run matches harmonypy's only in distribution; `harmony_from_centroids` starts from given
//! centroids and can take the cells' update order from the caller, which reproduces a harmonypy run
//! to f32 rounding (tests/harmony.rs).

use crate::error::{Error, Result};
use crate::threads::install;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;

/// Rows per parallel task; fixed, so results do not depend on the thread count.
const CHUNK: usize = 1024;
/// harmonypy: k-means convergence compares sums over windows of 3 objectives.
const WINDOW: usize = 3;
/// harmonypy / R harmony2: Lloyd iterations after the initial centroids are drawn.
const LLOYD_ITERATIONS: usize = 10;
/// harmonypy: a ridge pivot below this fraction of the largest diagonal entry is singular.
const MIN_PIVOT: f64 = 1e-10;

/// Harmony parameters; `Default` gives harmonypy 2.1.0's `run_harmony` defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct HarmonyOptions {
    /// Diversity penalty θ of every batch (default 2).
    pub theta: f64,
    /// Ridge penalty λ of every batch coefficient. `None` (default, harmonypy 2.x's `lamb=None`)
    /// estimates it per cluster and batch as `alpha · E(b, k)`.
    pub lambda: Option<f64>,
    /// Scale of the estimated λ (default 0.2); unused when `lambda` is set.
    pub alpha: f64,
    /// Soft-clustering bandwidth σ of every cluster (default 0.1).
    pub sigma: f64,
    /// Number of clusters K; `None` = `min(round(n / 30), 100)` (Python's round, ties to even).
    pub nclust: Option<usize>,
    /// Protection against over-correction of small batches: θ_b ← θ (1 − exp(−(N_b / (K τ))²)) when
    /// τ > 0 (default 0, off).
    pub tau: f64,
    /// Fraction of the cells reassigned per block (default 0.05).
    pub block_size: f64,
    /// Maximum Harmony iterations (default 10).
    pub max_iter_harmony: usize,
    /// Maximum k-means passes per Harmony iteration (default 4).
    pub max_iter_kmeans: usize,
    /// Relative objective change that ends the k-means passes (default 1e-3).
    pub epsilon_cluster: f64,
    /// Relative objective decrease that ends the Harmony iterations (default 1e-2).
    pub epsilon_harmony: f64,
    /// Minimum mean assignment of a batch to a cluster for it to be corrected there (default 1e-5).
    pub batch_prop_cutoff: f64,
    /// Seed of the initial centroids and the update order (default 0).
    pub seed: u64,
}

impl Default for HarmonyOptions {
    fn default() -> Self {
        HarmonyOptions {
            theta: 2.0,
            lambda: None,
            alpha: 0.2,
            sigma: 0.1,
            nclust: None,
            tau: 0.0,
            block_size: 0.05,
            max_iter_harmony: 10,
            max_iter_kmeans: 4,
            epsilon_cluster: 1e-3,
            epsilon_harmony: 1e-2,
            batch_prop_cutoff: 1e-5,
            seed: 0,
        }
    }
}

/// What `harmony` returns.
#[derive(Clone, Debug, PartialEq)]
pub struct HarmonyResult {
    /// Corrected embedding, n × d row-major (harmonypy's `Z_corr`).
    pub corrected: Vec<f64>,
    /// Final centroids, K × d row-major, unit rows (harmonypy's `Y`, transposed).
    pub centroids: Vec<f64>,
    /// Soft cluster assignments, n × K row-major, rows summing to 1 (harmonypy's `R`).
    pub assignments: Vec<f64>,
    /// K.
    pub nclust: usize,
    /// Harmony iterations run.
    pub iterations: usize,
    /// Whether the objective converged before `max_iter_harmony`.
    pub converged: bool,
    /// The objective after initialisation and after each iteration's clustering (harmonypy's
    /// `objective_harmony`).
    pub objective: Vec<f64>,
    /// k-means passes run in each iteration (harmonypy's `kmeans_rounds`).
    pub kmeans_rounds: Vec<usize>,
}

/// `progress(done, max_iter_harmony)` after each iteration; false cancels.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

/// Permutes the cells' indices (given as 0..n) into the order of the next k-means pass.
pub type UpdateOrder<'a> = &'a mut dyn FnMut(&mut [u32]);

/// harmonypy's default K: `min(round(n / 30), 100)`, rounding half to even like Python's `round`.
pub fn default_nclust(n: usize) -> usize {
    ((n as f64 / 30.0).round_ties_even() as usize).min(100)
}

/// Harmony of the n × d row-major embedding `x` over the batch columns `batches` (one or more, each
/// with one label per cell; a label is one batch, `|` is not special). `progress(done, max)` is
/// called after each iteration; returning false cancels (`Error::Cancelled`).
pub fn harmony<C, S>(
    x: &[f64],
    n: usize,
    d: usize,
    batches: &[C],
    opts: &HarmonyOptions,
    progress: Option<Progress>,
) -> Result<HarmonyResult>
where
    C: AsRef<[S]>,
    S: AsRef<str>,
{
    let (batches, k) = prepare(x, n, d, batches, opts, None)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let zcos = unit_rows(x, d);
    let y0 = kmeans_init(&zcos, n, d, k, &mut rng);
    let mut shuffle = |order: &mut [u32]| shuffle_in_place(order, &mut rng);
    run(x, n, d, &batches, opts, y0, &mut shuffle, progress)
}

/// Harmony started from the given K × d row-major centroids (normalised here) instead of the
/// seeded k-means. `order`, when given, replaces the seeded shuffle of the cells before each k-means
/// pass: it receives 0..n in order and permutes it in place (a pass updates the cells in that
/// order). With harmonypy's initial centroids and its update order this reproduces a harmonypy run.
/// `opts.nclust`, when set, must equal K; `opts.seed` is used only when `order` is `None`.
#[allow(clippy::too_many_arguments)]
pub fn harmony_from_centroids<C, S>(
    x: &[f64],
    n: usize,
    d: usize,
    batches: &[C],
    opts: &HarmonyOptions,
    centroids: &[f64],
    order: Option<UpdateOrder>,
    progress: Option<Progress>,
) -> Result<HarmonyResult>
where
    C: AsRef<[S]>,
    S: AsRef<str>,
{
    if d == 0 || centroids.is_empty() || !centroids.len().is_multiple_of(d) {
        return Err(Error::Shape(format!(
            "harmony: centroids have {} values, not a positive multiple of d = {d}",
            centroids.len()
        )));
    }
    let k = centroids.len() / d;
    check_finite(centroids, d, "centroids")?;
    let (batches, _) = prepare(x, n, d, batches, opts, Some(k))?;
    let y0 = unit_rows(centroids, d);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut seeded = |o: &mut [u32]| shuffle_in_place(o, &mut rng);
    let shuffle: UpdateOrder = match order {
        Some(f) => f,
        None => &mut seeded,
    };
    run(x, n, d, &batches, opts, y0, shuffle, progress)
}

// ---- batches ------------------------------------------------------------------------------------

/// Batch columns numbered: each column's distinct labels in sorted order, columns one after another.
struct Batches {
    n_vars: usize,
    /// n × n_vars: the global batch index of each cell in each column.
    ids: Vec<u32>,
    /// Column of each batch.
    var_of: Vec<usize>,
    /// Cells of each batch, ascending.
    members: Vec<Vec<u32>>,
    /// Pairs of batches from different columns that share cells: (a, b, cells).
    pairs: Vec<(usize, usize, Vec<u32>)>,
}

impl Batches {
    fn count(&self) -> usize {
        self.members.len()
    }

    fn of(&self, cell: usize) -> &[u32] {
        &self.ids[cell * self.n_vars..(cell + 1) * self.n_vars]
    }
}

fn factorize<C: AsRef<[S]>, S: AsRef<str>>(columns: &[C], n: usize) -> Result<Batches> {
    if columns.is_empty() {
        return Err(Error::InvalidArgument(
            "harmony: no batch column given".into(),
        ));
    }
    let n_vars = columns.len();
    let mut ids = vec![0u32; n * n_vars];
    let mut var_of = Vec::new();
    let mut members: Vec<Vec<u32>> = Vec::new();
    for (v, column) in columns.iter().enumerate() {
        let column = column.as_ref();
        if column.len() != n {
            return Err(Error::Shape(format!(
                "harmony: batch column {v} has {} labels for {n} cells",
                column.len()
            )));
        }
        let mut first_seen: HashMap<&str, u32> = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        let mut codes = Vec::with_capacity(n);
        for (i, label) in column.iter().enumerate() {
            let label = label.as_ref();
            if label.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "harmony: batch column {v} has an empty label at row {i}; label every cell"
                )));
            }
            let code = *first_seen.entry(label).or_insert_with(|| {
                names.push(label);
                (names.len() - 1) as u32
            });
            codes.push(code);
        }
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(names[b]));
        let offset = members.len();
        let mut rank = vec![0u32; names.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = (offset + r) as u32;
        }
        var_of.extend(std::iter::repeat_n(v, names.len()));
        members.extend(std::iter::repeat_n(Vec::new(), names.len()));
        for (i, &c) in codes.iter().enumerate() {
            let b = rank[c as usize];
            ids[i * n_vars + v] = b;
            members[b as usize].push(i as u32);
        }
    }
    let mut pairs = Vec::new();
    for u in 0..n_vars {
        for w in u + 1..n_vars {
            let mut index: HashMap<(u32, u32), usize> = HashMap::new();
            let mut list: Vec<(usize, usize, Vec<u32>)> = Vec::new();
            for i in 0..n {
                let key = (ids[i * n_vars + u], ids[i * n_vars + w]);
                let q = *index.entry(key).or_insert_with(|| {
                    list.push((key.0 as usize, key.1 as usize, Vec::new()));
                    list.len() - 1
                });
                list[q].2.push(i as u32);
            }
            pairs.extend(list);
        }
    }
    Ok(Batches {
        n_vars,
        ids,
        var_of,
        members,
        pairs,
    })
}

// ---- checks -------------------------------------------------------------------------------------

fn check_finite(x: &[f64], d: usize, what: &str) -> Result<()> {
    if x.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let i = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::NonFinite(format!(
        "harmony: {what} has a non-finite value ({}) at row {}, column {}",
        x[i],
        i / d,
        i % d
    )))
}

/// Validates the inputs and options; returns the batches and K.
fn prepare<C: AsRef<[S]>, S: AsRef<str>>(
    x: &[f64],
    n: usize,
    d: usize,
    columns: &[C],
    opts: &HarmonyOptions,
    given_k: Option<usize>,
) -> Result<(Batches, usize)> {
    if n == 0 || d == 0 {
        return Err(Error::Shape(format!(
            "harmony: the embedding must have at least one cell and one dimension, got {n} × {d}"
        )));
    }
    if n.checked_mul(d) != Some(x.len()) {
        return Err(Error::shape_mismatch(
            "harmony: embedding",
            &[n, d],
            &[x.len()],
        ));
    }
    if n > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "harmony: {n} cells exceed the supported maximum {}",
            u32::MAX
        )));
    }
    check_finite(x, d, "the embedding")?;
    let bad = |what: &str, v: f64| Err(Error::InvalidArgument(format!("harmony: {what} is {v}")));
    if !(opts.theta.is_finite() && opts.theta >= 0.0) {
        return bad("theta (must be finite and >= 0)", opts.theta);
    }
    if let Some(l) = opts.lambda {
        if !(l.is_finite() && l >= 0.0) {
            return bad(
                "lambda (must be finite and >= 0, or None to estimate it)",
                l,
            );
        }
    }
    if !(opts.alpha.is_finite() && opts.alpha >= 0.0) {
        return bad("alpha (must be finite and >= 0)", opts.alpha);
    }
    if !(opts.sigma.is_finite() && opts.sigma > 0.0) {
        return bad("sigma (must be finite and > 0)", opts.sigma);
    }
    if !(opts.tau.is_finite() && opts.tau >= 0.0) {
        return bad("tau (must be finite and >= 0)", opts.tau);
    }
    if !(opts.block_size > 0.0 && opts.block_size <= 1.0) {
        return bad("block_size (must be in (0, 1])", opts.block_size);
    }
    for (what, v) in [
        ("epsilon_cluster", opts.epsilon_cluster),
        ("epsilon_harmony", opts.epsilon_harmony),
        ("batch_prop_cutoff", opts.batch_prop_cutoff),
    ] {
        if !v.is_finite() {
            return bad(&format!("{what} (must be finite)"), v);
        }
    }
    let k = match (opts.nclust, given_k) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::InvalidArgument(format!(
                "harmony: nclust is {a} but {b} centroids were given"
            )))
        }
        (_, Some(b)) => b,
        (Some(a), None) => a,
        (None, None) => {
            let k = default_nclust(n);
            if k == 0 {
                return Err(Error::InvalidArgument(format!(
                    "harmony: {n} cells give 0 clusters by default (round(n / 30)); set nclust"
                )));
            }
            k
        }
    };
    if k == 0 || k > n {
        return Err(Error::InvalidArgument(format!(
            "harmony: nclust is {k}; it must be between 1 and the number of cells ({n})"
        )));
    }
    Ok((factorize(columns, n)?, k))
}

// ---- small kernels ------------------------------------------------------------------------------

/// Rows scaled to unit L2 norm (a zero row stays zero).
fn unit_rows(x: &[f64], d: usize) -> Vec<f64> {
    let mut out = x.to_vec();
    normalise_rows(&mut out, d);
    out
}

fn normalise_rows(x: &mut [f64], d: usize) {
    x.par_chunks_mut(CHUNK * d).for_each(|block| {
        for row in block.chunks_exact_mut(d) {
            let s: f64 = row.iter().map(|v| v * v).sum();
            if s > 0.0 {
                let inv = 1.0 / s.sqrt();
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    });
}

/// `dst (m × n) = a (m × k) · bᵀ`, `b` being n × k; all row-major.
fn gemm_abt(dst: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize) {
    matmul(
        MatMut::from_row_major_slice_mut(dst, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(b, n, k).transpose(),
        1.0,
        Par::Seq,
    );
}

/// `dst (k × n) = aᵀ · b`, `a` being m × k and `b` m × n; all row-major.
fn gemm_atb(dst: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize) {
    matmul(
        MatMut::from_row_major_slice_mut(dst, k, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k).transpose(),
        MatRef::from_row_major_slice(b, m, n),
        1.0,
        Par::Seq,
    );
}

/// `dst (m × n) = a (m × k) · b (k × n)`; all row-major.
fn gemm_ab(dst: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize) {
    matmul(
        MatMut::from_row_major_slice_mut(dst, m, n),
        Accum::Replace,
        MatRef::from_row_major_slice(a, m, k),
        MatRef::from_row_major_slice(b, k, n),
        1.0,
        Par::Seq,
    );
}

/// The first `len` elements of a reusable buffer (grown as needed; contents unspecified).
fn scratch(buf: &mut Vec<f64>, len: usize) -> &mut [f64] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// e^x for x ≤ 0, vectorisable (no branch, no float→int conversion: the integer part is read from
/// the mantissa of x·log2(e) + 1.5·2⁵²). fdlibm's two-part ln 2 reduction, then Taylor to r¹³
/// (|r| ≤ ln2/2, truncation < 1e-17 relative). Inputs below −708 give e^−708 ≈ 3e-308 instead of
/// less: only shifted logits (max 0) come here, so that is below 1e-307 of the row's total.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const INV_FACT: [f64; 14] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
        1.0 / 6227020800.0,
    ];
    let x = x.max(-708.0);
    let t = x * std::f64::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = INV_FACT[13];
    for c in INV_FACT[..13].iter().rev() {
        p = p * r + c;
    }
    let pow2 = f64::from_bits((t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(1023)) << 52);
    pow2 * p
}

const LANES: usize = 8;

/// Softmax of the logits in `row` in place (shifted by the max), and its terms of the objective:
/// returns (normaliser, Σ p·dist, Σ σ p ln p). The entropy needs no logarithm per cluster: with
/// p = e/total and ln p = s − ln(total) (s the shifted logit), Σ σ p ln p = (Σ σ e s − ln(total) Σ σ e)
/// / total. Sums run in 8 lanes so the loops vectorise. A normaliser that is not finite and positive
/// means the row is invalid. Inlined into the per-CPU kernels below.
#[inline(always)]
fn softmax_row(row: &mut [f64], dist: &[f64], sigma: &[f64]) -> (f64, f64, f64) {
    let k = row.len();
    let (dist, sigma) = (&dist[..k], &sigma[..k]);
    let body = k - k % LANES;
    let mut lanes = [f64::NEG_INFINITY; LANES];
    for chunk in row[..body].chunks_exact(LANES) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(*v);
        }
    }
    let max = row[body..]
        .iter()
        .chain(lanes.iter())
        .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let mut total = [0.0; LANES];
    let mut weighted = [0.0; LANES];
    let mut weighted_shifted = [0.0; LANES];
    for ((chunk, s), _) in row[..body]
        .chunks_exact_mut(LANES)
        .zip(sigma[..body].chunks_exact(LANES))
        .zip(0..)
    {
        for l in 0..LANES {
            let shifted = chunk[l] - max;
            let e = exp_nonpositive(shifted);
            chunk[l] = e;
            total[l] += e;
            weighted[l] += s[l] * e;
            weighted_shifted[l] += s[l] * e * shifted;
        }
    }
    let (mut t, mut w, mut ws) = (0.0, 0.0, 0.0);
    for (v, s) in row[body..].iter_mut().zip(&sigma[body..]) {
        let shifted = *v - max;
        let e = exp_nonpositive(shifted);
        *v = e;
        t += e;
        w += s * e;
        ws += s * e * shifted;
    }
    t += total.iter().sum::<f64>();
    w += weighted.iter().sum::<f64>();
    ws += weighted_shifted.iter().sum::<f64>();
    if !(t.is_finite() && t > 0.0) {
        return (t, 0.0, 0.0);
    }
    let inv = 1.0 / t;
    let mut error = [0.0; LANES];
    for (chunk, dc) in row[..body]
        .chunks_exact_mut(LANES)
        .zip(dist[..body].chunks_exact(LANES))
    {
        for l in 0..LANES {
            chunk[l] *= inv;
            error[l] += chunk[l] * dc[l];
        }
    }
    let mut err = 0.0;
    for (v, dv) in row[body..].iter_mut().zip(&dist[body..]) {
        *v *= inv;
        err += *v * dv;
    }
    err += error.iter().sum::<f64>();
    (t, err, (ws - t.ln() * w) * inv)
}

/// dist rows = 2(1 − similarity) in place, R rows = softmax(−dist/σ). Returns (all rows valid,
/// Σ p·dist, Σ σ p ln p).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
fn assign_rows(
    dist: &mut [f64],
    r: &mut [f64],
    sigma: &[f64],
    neg_inv_sigma: &[f64],
) -> (bool, f64, f64) {
    let k = sigma.len();
    let (mut ok, mut err, mut ent) = (true, 0.0, 0.0);
    for (drow, rrow) in dist.chunks_exact_mut(k).zip(r.chunks_exact_mut(k)) {
        for ((dv, rv), s) in drow.iter_mut().zip(rrow.iter_mut()).zip(neg_inv_sigma) {
            *dv = 2.0 * (1.0 - *dv);
            *rv = *dv * s;
        }
        let (total, e, h) = softmax_row(rrow, drow, sigma);
        ok &= valid_normaliser(total);
        err += e;
        ent += h;
    }
    (ok, err, ent)
}

/// Reassigns cells: `rows` (cells × K) hold their similarities to the centroids on entry and their
/// new assignments on return; logits −dist/σ + the log diversity penalty of each of the cell's
/// batches (`log_div`, B × K; `ids`, cells × columns, their batches), softmax. Returns
/// (Σ p·dist, Σ σ p ln p, all rows valid).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
fn reassign_rows(
    rows: &mut [f64],
    dist: &mut [f64],
    ids: &[u32],
    sigma: &[f64],
    neg_inv_sigma: &[f64],
    log_div: &[f64],
) -> (f64, f64, bool) {
    let k = sigma.len();
    let v = ids.len() / (rows.len() / k).max(1);
    let (mut err, mut ent, mut ok) = (0.0, 0.0, true);
    for ((row, drow), bs) in rows
        .chunks_exact_mut(k)
        .zip(dist.chunks_exact_mut(k))
        .zip(ids.chunks_exact(v.max(1)))
    {
        for ((r, dv), s) in row.iter_mut().zip(drow.iter_mut()).zip(neg_inv_sigma) {
            *dv = 2.0 * (1.0 - *dv);
            *r = *dv * s;
        }
        for &b in bs {
            let ld = &log_div[b as usize * k..(b as usize + 1) * k];
            row.iter_mut().zip(ld).for_each(|(a, v)| *a += v);
        }
        let (total, e, h) = softmax_row(row, drow, sigma);
        ok &= valid_normaliser(total);
        err += e;
        ent += h;
    }
    (err, ent, ok)
}

/// Per batch (B × `kn`, batch-major) the sums of columns k0..k0+kn of the rows of `r` (cells × K),
/// and their totals over all cells (`kn`); `ids` (cells × columns) are the cells' batches.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+fma+avx2",
    "x86_64+avx2+fma"
))]
fn block_sums(r: &[f64], ids: &[u32], k: usize, k0: usize, delta: &mut [f64], totals: &mut [f64]) {
    let kn = totals.len();
    let v = ids.len() / (r.len() / k).max(1);
    for (row, bs) in r.chunks_exact(k).zip(ids.chunks_exact(v.max(1))) {
        let seg = &row[k0..k0 + kn];
        totals.iter_mut().zip(seg).for_each(|(a, v)| *a += v);
        for &b in bs {
            let dst = &mut delta[b as usize * kn..(b as usize + 1) * kn];
            dst.iter_mut().zip(seg).for_each(|(a, v)| *a += v);
        }
    }
}

fn valid_normaliser(total: f64) -> bool {
    total.is_finite() && total > 0.0
}

fn numerical(stage: &str) -> Error {
    Error::Internal(format!(
        "harmony: numerical error during {stage}: an assignment normaliser is not finite and positive"
    ))
}

/// Fisher–Yates shuffle with this library's generator.
fn shuffle_in_place(order: &mut [u32], rng: &mut ChaCha8Rng) {
    for i in (1..order.len()).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
}

// ---- initial centroids --------------------------------------------------------------------------

/// R harmony2's initialisation, with this library's generator: K random cells; for centroid i a
/// cell (not yet chosen) drawn with probability ∝ |2(1 − y_i·z)| + 1e-10, y_i being the i-th random
/// cell (harmonypy draws the same distribution as the exponential race argmin −ln(u)/distance);
/// then 10 Lloyd iterations with Armadillo's recovery of empty clusters. Returns K × d.
fn kmeans_init(z: &[f64], n: usize, d: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let picks: Vec<usize> = (0..k).map(|_| rng.gen_range(0..n)).collect();
    let mut seeds = vec![0.0; k * d];
    for (i, &p) in picks.iter().enumerate() {
        seeds[i * d..(i + 1) * d].copy_from_slice(&z[p * d..(p + 1) * d]);
    }
    // Per chunk of cells, the K × cells similarities to the seeds: row i of each chunk is then
    // contiguous for centroid i's draw.
    let sim: Vec<Vec<f64>> = z
        .par_chunks(CHUNK * d)
        .map(|zc| {
            let mut out = vec![0.0; k * (zc.len() / d)];
            gemm_abt(&mut out, &seeds, zc, k, d, zc.len() / d);
            out
        })
        .collect();
    let mut chosen = vec![false; n];
    let mut means = vec![0.0; k * d];
    let mut weights = vec![0.0; n];
    for i in 0..k {
        let mut total = 0.0;
        for (c, block) in sim.iter().enumerate() {
            let len = block.len() / k;
            let row = &block[i * len..(i + 1) * len];
            let ws = &mut weights[c * CHUNK..c * CHUNK + len];
            for ((w, s), &taken) in ws.iter_mut().zip(row).zip(&chosen[c * CHUNK..]) {
                *w = if taken {
                    0.0
                } else {
                    (2.0 * (1.0 - s)).abs() + 1e-10
                };
                total += *w;
            }
        }
        let target = rng.gen::<f64>() * total;
        let mut acc = 0.0;
        let mut pick = None;
        for (j, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                acc += w;
                pick = Some(j);
                if acc > target {
                    break;
                }
            }
        }
        // k <= n, so some cell is still free.
        let pick = pick.unwrap_or(0);
        chosen[pick] = true;
        means[i * d..(i + 1) * d].copy_from_slice(&z[pick * d..(pick + 1) * d]);
    }
    for _ in 0..LLOYD_ITERATIONS {
        match lloyd_step(z, &means, n, d, k, rng) {
            Some(m) => means = m,
            None => break,
        }
    }
    normalise_rows(&mut means, d);
    means
}

/// One Lloyd iteration (nearest mean by squared Euclidean distance, first on ties; means are cell
/// averages); an empty mean takes the last cell of a mean with at least two cells, in decreasing
/// order of index, else a random cell (Armadillo's `kmeans`). `None` when it cannot recover.
fn lloyd_step(
    z: &[f64],
    means: &[f64],
    n: usize,
    d: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<f64>> {
    let norms: Vec<f64> = means
        .chunks_exact(d)
        .map(|m| m.iter().map(|v| v * v).sum())
        .collect();
    // Per chunk of cells: nearest means, and each mean's coordinate sum, count and last cell.
    let parts: Vec<(Vec<f64>, Vec<usize>, Vec<usize>)> = z
        .par_chunks(CHUNK * d)
        .enumerate()
        .map_init(Vec::new, |sim, (c, zc)| {
            let rows = zc.len() / d;
            let sim = scratch(sim, rows * k);
            gemm_abt(sim, zc, means, rows, d, k);
            let mut sums = vec![0.0; k * d];
            let mut counts = vec![0usize; k];
            let mut last = vec![0usize; k];
            for (t, (srow, zrow)) in sim.chunks_exact(k).zip(zc.chunks_exact(d)).enumerate() {
                let mut best = 0;
                let mut best_d = f64::INFINITY;
                for (g, (&sv, &nv)) in srow.iter().zip(&norms).enumerate() {
                    let dist = nv - 2.0 * sv;
                    if dist < best_d {
                        best_d = dist;
                        best = g;
                    }
                }
                counts[best] += 1;
                last[best] = c * CHUNK + t;
                sums[best * d..(best + 1) * d]
                    .iter_mut()
                    .zip(zrow)
                    .for_each(|(s, v)| *s += v);
            }
            (sums, counts, last)
        })
        .collect();
    let mut sums = vec![0.0; k * d];
    let mut counts = vec![0usize; k];
    let mut last = vec![0usize; k];
    for (ps, pc, pl) in parts {
        sums.iter_mut().zip(&ps).for_each(|(a, v)| *a += v);
        for g in 0..k {
            if pc[g] > 0 {
                counts[g] += pc[g];
                last[g] = pl[g];
            }
        }
    }
    let dead: Vec<usize> = (0..k).filter(|&g| counts[g] == 0).collect();
    let live: Vec<usize> = (0..k).rev().filter(|&g| counts[g] >= 2).collect();
    for g in 0..k {
        if counts[g] > 0 {
            let inv = 1.0 / counts[g] as f64;
            sums[g * d..(g + 1) * d].iter_mut().for_each(|v| *v *= inv);
        }
    }
    if !dead.is_empty() && live.is_empty() {
        return None;
    }
    for (t, &g) in dead.iter().enumerate() {
        let cell = match live.get(t) {
            Some(&l) if l == g => return None,
            Some(&l) => last[l],
            None => rng.gen_range(0..n),
        };
        sums[g * d..(g + 1) * d].copy_from_slice(&z[cell * d..(cell + 1) * d]);
    }
    Some(sums)
}

// ---- the iterations -----------------------------------------------------------------------------

struct State<'a> {
    n: usize,
    d: usize,
    k: usize,
    x: &'a [f64],
    batches: &'a Batches,
    sigma: Vec<f64>,
    theta: Vec<f64>,
    pr: Vec<f64>,
    sizes: Vec<f64>,
    lambda: Option<f64>,
    alpha: f64,
    cutoff: f64,
    block_size: f64,
    eps_cluster: f64,
    eps_harmony: f64,
    zcos: Vec<f64>,
    corrected: Vec<f64>,
    /// K × d.
    y: Vec<f64>,
    /// n × K.
    r: Vec<f64>,
    /// O, K × B (cluster-major).
    o: Vec<f64>,
    /// E, K × B (cluster-major).
    e: Vec<f64>,
    obj_kmeans: Vec<f64>,
    obj_harmony: Vec<f64>,
    rounds: Vec<usize>,
    order: Vec<u32>,
}

#[allow(clippy::too_many_arguments)]
fn run(
    x: &[f64],
    n: usize,
    d: usize,
    batches: &Batches,
    opts: &HarmonyOptions,
    y0: Vec<f64>,
    shuffle: UpdateOrder,
    progress: Option<Progress>,
) -> Result<HarmonyResult> {
    // The loop runs on the caller's thread (the callbacks need not be Send); the heavy steps run
    // in the library's thread pool.
    let mut s = State::new(x, n, d, batches, opts, y0);
    install(|| s.initialise())?;
    let mut progress = progress;
    let max_iter = opts.max_iter_harmony;
    let (mut iterations, mut converged) = (0, false);
    for it in 1..=max_iter {
        if s.obj_harmony.len() > 1 {
            install(|| s.reset_assignments())?;
        }
        let mut rounds = 0;
        for i in 0..opts.max_iter_kmeans {
            for (j, v) in s.order.iter_mut().enumerate() {
                *v = j as u32;
            }
            shuffle(&mut s.order);
            check_permutation(&s.order)?;
            install(|| s.update_r())?;
            rounds = i + 1;
            if i > WINDOW && s.kmeans_converged() {
                break;
            }
        }
        s.rounds.push(rounds);
        s.obj_harmony.push(s.obj_kmeans[s.obj_kmeans.len() - 1]);
        install(|| s.correct())?;
        iterations = it;
        converged = s.harmony_converged();
        if let Some(p) = progress.as_mut() {
            if !p(it, max_iter) {
                return Err(Error::Cancelled);
            }
        }
        if converged {
            break;
        }
    }
    if iterations == 0 {
        // harmonypy would return the cosine-normalised input here; no iteration = no correction.
        s.corrected = x.to_vec();
    }
    Ok(HarmonyResult {
        corrected: s.corrected,
        centroids: s.y,
        assignments: s.r,
        nclust: s.k,
        iterations,
        converged,
        objective: s.obj_harmony,
        kmeans_rounds: s.rounds,
    })
}

impl<'a> State<'a> {
    fn new(
        x: &'a [f64],
        n: usize,
        d: usize,
        batches: &'a Batches,
        opts: &HarmonyOptions,
        y: Vec<f64>,
    ) -> Self {
        let k = y.len() / d;
        let nb = batches.count();
        let sizes: Vec<f64> = batches.members.iter().map(|m| m.len() as f64).collect();
        let pr = sizes.iter().map(|s| s / n as f64).collect();
        let theta = sizes
            .iter()
            .map(|&nb| {
                if opts.tau > 0.0 {
                    let t = nb / (k as f64 * opts.tau);
                    opts.theta * (1.0 - (-t * t).exp())
                } else {
                    opts.theta
                }
            })
            .collect();
        State {
            n,
            d,
            k,
            x,
            batches,
            sigma: vec![opts.sigma; k],
            theta,
            pr,
            sizes,
            lambda: opts.lambda,
            alpha: opts.alpha,
            cutoff: opts.batch_prop_cutoff,
            block_size: opts.block_size,
            eps_cluster: opts.epsilon_cluster,
            eps_harmony: opts.epsilon_harmony,
            zcos: unit_rows(x, d),
            corrected: Vec::new(),
            y,
            r: vec![0.0; n * k],
            o: vec![0.0; nb * k],
            e: vec![0.0; nb * k],
            obj_kmeans: Vec::new(),
            obj_harmony: Vec::new(),
            rounds: Vec::new(),
            order: (0..n as u32).collect(),
        }
    }

    fn initialise(&mut self) -> Result<()> {
        let (error, entropy) = self.assign_without_diversity("initialisation")?;
        self.rebuild_o_e();
        self.record_objective(error, entropy);
        self.obj_harmony
            .push(self.obj_kmeans[self.obj_kmeans.len() - 1]);
        Ok(())
    }

    /// R = softmax(−dist/σ) for every cell, dist = 2(1 − Z_cos Yᵀ); returns the objective's
    /// Σ R·dist and Σ σ R ln R.
    fn assign_without_diversity(&mut self, stage: &str) -> Result<(f64, f64)> {
        let (d, k) = (self.d, self.k);
        let (y, sigma) = (&self.y, &self.sigma);
        let neg_inv_sigma: Vec<f64> = sigma.iter().map(|s| -1.0 / s).collect();
        let parts: Vec<(bool, f64, f64)> = self
            .r
            .par_chunks_mut(CHUNK * k)
            .zip(self.zcos.par_chunks(CHUNK * d))
            .map_init(Vec::new, |dist, (r, z)| {
                let dist = scratch(dist, r.len());
                gemm_abt(dist, z, y, z.len() / d, d, k);
                assign_rows(dist, r, sigma, &neg_inv_sigma)
            })
            .collect();
        let (mut error, mut entropy) = (0.0, 0.0);
        for (ok, e, h) in parts {
            if !ok {
                return Err(numerical(stage));
            }
            error += e;
            entropy += h;
        }
        Ok((error, entropy))
    }

    /// E(k, b) = Pr_b Σ_cells R(·, k) and O(k, b) = Σ_{cells of b} R(·, k) (both K × B).
    fn rebuild_o_e(&mut self) {
        let (k, nb) = (self.k, self.batches.count());
        let partials: Vec<Vec<f64>> = self
            .r
            .par_chunks(CHUNK * k)
            .map(|r| {
                let mut acc = vec![0.0; k];
                for row in r.chunks_exact(k) {
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let mut totals = vec![0.0; k];
        for p in &partials {
            totals.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        let r = &self.r;
        let per_batch: Vec<Vec<f64>> = self
            .batches
            .members
            .par_iter()
            .map(|cells| {
                let mut acc = vec![0.0; k];
                for &j in cells {
                    let row = &r[j as usize * k..(j as usize + 1) * k];
                    acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        for (b, (sums, p)) in per_batch.iter().zip(&self.pr).enumerate() {
            for c in 0..k {
                self.e[c * nb + b] = totals[c] * p;
                self.o[c * nb + b] = sums[c];
            }
        }
    }

    fn record_objective(&mut self, error: f64, entropy: f64) {
        let nb = self.batches.count();
        let mut cross = 0.0;
        for (c, (o, e)) in self
            .o
            .chunks_exact(nb)
            .zip(self.e.chunks_exact(nb))
            .enumerate()
        {
            for b in 0..nb {
                cross += self.sigma[c]
                    * self.theta[b]
                    * o[b]
                    * ((o[b] + e[b] + 1.0) / (2.0 * e[b] + 1.0)).ln();
            }
        }
        self.obj_kmeans
            .push((error + entropy + cross) * 2000.0 / self.n as f64);
    }

    /// Before the k-means passes of every iteration but the first: the corrected cells
    /// re-normalised, dist recomputed, R reset without the diversity penalty, O and E rebuilt.
    fn reset_assignments(&mut self) -> Result<()> {
        self.zcos.copy_from_slice(&self.corrected);
        normalise_rows(&mut self.zcos, self.d);
        self.assign_without_diversity("cluster initialisation")?;
        self.rebuild_o_e();
        Ok(())
    }

    fn kmeans_converged(&self) -> bool {
        let o = &self.obj_kmeans;
        if o.len() <= WINDOW + 1 {
            return false;
        }
        let m = o.len();
        let old: f64 = (0..WINDOW).map(|i| o[m - 2 - i]).sum();
        let new: f64 = (0..WINDOW).map(|i| o[m - 1 - i]).sum();
        (old - new).abs() / old.abs() < self.eps_cluster
    }

    fn harmony_converged(&self) -> bool {
        let o = &self.obj_harmony;
        if o.len() < 2 {
            return false;
        }
        let (old, new) = (o[o.len() - 2], o[o.len() - 1]);
        if !(old.is_finite() && new.is_finite()) {
            return false;
        }
        if old == 0.0 {
            return new == 0.0;
        }
        let delta = (old - new) / old.abs();
        delta >= 0.0 && delta < self.eps_harmony
    }

    /// One k-means pass over the cells in `self.order`, block by block, each block reassigned with
    /// O and E of the other cells frozen.
    fn update_r(&mut self) -> Result<()> {
        let (n, d, k, v) = (self.n, self.d, self.k, self.batches.n_vars);
        // harmonypy computes these in f32 (block_size is a float there).
        let bs = self.block_size as f32;
        let n_blocks = (1.0 / bs as f64).ceil() as usize;
        let per_block = ((n as f32 * bs) as usize).max(1);
        let (mut error, mut entropy) = (0.0, 0.0);
        let nb = self.batches.count();
        let neg_inv_sigma: Vec<f64> = self.sigma.iter().map(|s| -1.0 / s).collect();
        let mut log_div = vec![0.0; nb * k];
        let mut cells: Vec<u32> = Vec::new();
        let (mut rbuf, mut zbuf, mut ids): (Vec<f64>, Vec<f64>, Vec<u32>) = Default::default();
        const ROWS: usize = 256;
        let State {
            r,
            o,
            e,
            y,
            zcos,
            sigma,
            theta,
            pr,
            batches,
            order,
            ..
        } = self;
        let batches: &Batches = batches;
        for blk in 0..n_blocks {
            let lo = blk * per_block;
            if lo >= n {
                break;
            }
            let hi = if blk + 1 == n_blocks {
                n
            } else {
                ((blk + 1) * per_block).min(n)
            };
            // Within a block every cell sees the same frozen O and E, so the block's cells can be
            // visited in increasing order: their rows of R are then disjoint slices taken in one
            // sweep; they are gathered, updated contiguously and written back, in parallel.
            cells.clear();
            cells.extend_from_slice(&order[lo..hi]);
            cells.sort_unstable();
            let m = cells.len();
            let mut rows: Vec<&mut [f64]> = Vec::with_capacity(m);
            let mut it = r.chunks_exact_mut(k);
            let mut next = 0;
            for &j in &cells {
                match it.nth(j as usize - next) {
                    Some(row) => rows.push(row),
                    None => return Err(Error::Internal("harmony: cell index out of range".into())),
                }
                next = j as usize + 1;
            }
            rbuf.resize(m * k, 0.0);
            zbuf.resize(m * d, 0.0);
            ids.resize(m * v, 0);
            rbuf.par_chunks_mut(ROWS * k)
                .zip(zbuf.par_chunks_mut(ROWS * d))
                .zip(ids.par_chunks_mut(ROWS * v))
                .zip(rows.par_chunks(ROWS).zip(cells.par_chunks(ROWS)))
                .for_each(|(((rb, zb), ib), (rs, cs))| {
                    for ((((dst, zd), id), src), &j) in rb
                        .chunks_exact_mut(k)
                        .zip(zb.chunks_exact_mut(d))
                        .zip(ib.chunks_exact_mut(v))
                        .zip(rs)
                        .zip(cs)
                    {
                        let j = j as usize;
                        dst.copy_from_slice(src);
                        zd.copy_from_slice(&zcos[j * d..(j + 1) * d]);
                        id.copy_from_slice(batches.of(j));
                    }
                });
            shift_block(&rbuf, &ids, pr, o, e, k, -1.0);
            for (b, ld) in log_div.chunks_exact_mut(k).enumerate() {
                for (c, v) in ld.iter_mut().enumerate() {
                    let (oc, ec) = (o[c * nb + b], e[c * nb + b]);
                    *v = theta[b] * ((2.0 * ec + 1.0).ln() - (oc + ec + 1.0).ln());
                }
            }
            let (y, sigma, log_div, neg_inv_sigma) = (&*y, &*sigma, &log_div, &neg_inv_sigma);
            // New assignments go to rbuf (for O and E) and, while still in cache, to R.
            let parts: Vec<(f64, f64, bool)> = rbuf
                .par_chunks_mut(ROWS * k)
                .zip(zbuf.par_chunks(ROWS * d))
                .zip(ids.par_chunks(ROWS * v))
                .zip(rows.par_chunks_mut(ROWS))
                .map_init(Vec::new, |dist, (((rb, zb), ib), rs)| {
                    let dist = scratch(dist, rb.len());
                    gemm_abt(dist, zb, y, zb.len() / d, d, k);
                    let stats = reassign_rows(rb, dist, ib, sigma, neg_inv_sigma, log_div);
                    for (dst, src) in rs.iter_mut().zip(rb.chunks_exact(k)) {
                        dst.copy_from_slice(src);
                    }
                    stats
                })
                .collect();
            for (err, ent, ok) in parts {
                if !ok {
                    return Err(numerical("assignment update"));
                }
                error += err;
                entropy += ent;
            }
            shift_block(&rbuf, &ids, pr, o, e, k, 1.0);
        }
        self.record_objective(error, entropy);
        Ok(())
    }

    /// The ridge regressions and the correction `Z_corr = Z − Σ_batches R M_b`; the regressions'
    /// intercepts become the centroids.
    fn correct(&mut self) -> Result<()> {
        let (n, d, k) = (self.n, self.d, self.k);
        let (intercepts, m) = self.ridge()?;
        for (c, row) in intercepts.iter().enumerate() {
            if let Some(row) = row {
                self.y[c * d..(c + 1) * d].copy_from_slice(row);
            }
        }
        let mut corrected = self.x.to_vec();
        for v in 0..self.batches.n_vars {
            let tasks: Vec<(usize, &[u32])> = (0..self.batches.count())
                .filter(|&b| self.batches.var_of[b] == v && !m[b].is_empty())
                .flat_map(|b| self.batches.members[b].chunks(CHUNK).map(move |c| (b, c)))
                .collect();
            // The batches of one column are disjoint, so every task owns its cells' rows.
            let mut slots: Vec<Option<&mut [f64]>> =
                corrected.chunks_exact_mut(d).map(Some).collect();
            let mut owned: Vec<Vec<&mut [f64]>> = Vec::with_capacity(tasks.len());
            for (_, cells) in &tasks {
                let rows = cells
                    .iter()
                    .map(|&j| slots[j as usize].take())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::Internal("harmony: a cell is in two batches of one column".into())
                    })?;
                owned.push(rows);
            }
            owned.par_iter_mut().zip(tasks.par_iter()).for_each_init(
                || (Vec::new(), Vec::new()),
                |(rc, out), (rows, &(b, cells))| {
                    let rc = self.gather_r(cells, rc);
                    let out = scratch(out, cells.len() * d);
                    gemm_ab(out, rc, &m[b], cells.len(), k, d);
                    for (row, delta) in rows.iter_mut().zip(out.chunks_exact(d)) {
                        row.iter_mut().zip(delta).for_each(|(a, v)| *a -= v);
                    }
                },
            );
        }
        debug_assert_eq!(corrected.len(), n * d);
        self.corrected = corrected;
        normalise_rows(&mut self.y, d);
        Ok(())
    }

    /// Per cluster: the intercept (the new centroid, `None` for a cluster that corrects nothing)
    /// and, per batch, the K × d correction directions M_b (empty for a batch no cluster corrects).
    #[allow(clippy::type_complexity)]
    fn ridge(&self) -> Result<(Vec<Option<Vec<f64>>>, Vec<Vec<f64>>)> {
        let (d, k, nb) = (self.d, self.k, self.batches.count());
        let batches = self.batches;
        let n_vars = batches.n_vars;
        // The batches each cluster corrects: mean assignment above the cutoff, in a column with at
        // least two such batches.
        let keeps: Vec<Vec<usize>> = (0..k)
            .map(|c| {
                let pass: Vec<bool> = (0..nb)
                    .map(|b| self.o[c * nb + b] / self.sizes[b] > self.cutoff)
                    .collect();
                let mut levels = vec![0usize; n_vars];
                for b in 0..nb {
                    levels[batches.var_of[b]] += pass[b] as usize;
                }
                (0..nb)
                    .filter(|&b| pass[b] && levels[batches.var_of[b]] > 1)
                    .collect()
            })
            .collect();
        let mut used = vec![false; nb];
        for keep in &keeps {
            for &b in keep {
                used[b] = true;
            }
        }
        // Per used batch: Σ R ⊗ z (K × d) and Σ R (K), from the original embedding.
        let (rz, rs) = self.batch_sums(&used);
        // Several columns: the intercept counts each cell once (if any of its batches is kept in the
        // cluster) and kept batches of different columns overlap.
        let multi = n_vars > 1;
        let (z_all, cov_sum, pair_sums) = if multi {
            let mut kept = vec![false; nb * k];
            for (c, keep) in keeps.iter().enumerate() {
                for &b in keep {
                    kept[b * k + c] = true;
                }
            }
            let (z_all, cov_sum) = self.masked_sums(&kept);
            let r = &self.r;
            let pair_sums: Vec<Vec<f64>> = batches
                .pairs
                .par_iter()
                .map(|(_, _, cells)| {
                    let mut acc = vec![0.0; k];
                    for &j in cells {
                        let row = &r[j as usize * k..(j as usize + 1) * k];
                        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                    }
                    acc
                })
                .collect();
            (z_all, cov_sum, pair_sums)
        } else {
            (Vec::new(), Vec::new(), Vec::new())
        };
        let solved: Vec<Result<Option<(Vec<f64>, Vec<Vec<f64>>)>>> = (0..k)
            .into_par_iter()
            .map(|c| {
                let keep = &keeps[c];
                if keep.is_empty() {
                    return Ok(None);
                }
                let system = RidgeSystem {
                    cluster: c,
                    keep,
                    var_of: &batches.var_of,
                    n_vars,
                    d,
                    rz: &rz,
                    rs: &rs,
                    penalty: |b: usize| match self.lambda {
                        Some(l) => l,
                        None => self.alpha * self.e[c * nb + b],
                    },
                    multi: multi.then(|| Multi {
                        z_all: &z_all[c * d..(c + 1) * d],
                        cov_sum: cov_sum[c],
                        pairs: &batches.pairs,
                        pair_sums: &pair_sums,
                    }),
                };
                system.solve().map(Some)
            })
            .collect();
        let mut intercepts = vec![None; k];
        let mut m: Vec<Vec<f64>> = (0..nb)
            .map(|b| {
                if used[b] {
                    vec![0.0; k * d]
                } else {
                    Vec::new()
                }
            })
            .collect();
        for (c, s) in solved.into_iter().enumerate() {
            if let Some((intercept, dirs)) = s? {
                intercepts[c] = Some(intercept);
                for (&b, dir) in keeps[c].iter().zip(dirs) {
                    m[b][c * d..(c + 1) * d].copy_from_slice(&dir);
                }
            }
        }
        Ok((intercepts, m))
    }

    /// For each used batch b: `rz[b]` = Rᵀ Z over its cells (K × d) and `rs[b]` = Σ R (K).
    fn batch_sums(&self, used: &[bool]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let (d, k) = (self.d, self.k);
        let tasks: Vec<(usize, &[u32])> = (0..self.batches.count())
            .filter(|&b| used[b])
            .flat_map(|b| self.batches.members[b].chunks(CHUNK).map(move |c| (b, c)))
            .collect();
        let partials: Vec<(Vec<f64>, Vec<f64>)> = tasks
            .par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(rc, zc), &(_, cells)| {
                    let rc = self.gather_r(cells, rc);
                    self.weighted_sums(cells, rc, zc)
                },
            )
            .collect();
        let nb = self.batches.count();
        let mut rz: Vec<Vec<f64>> = vec![Vec::new(); nb];
        let mut rs: Vec<Vec<f64>> = vec![Vec::new(); nb];
        for ((b, _), (pz, ps)) in tasks.iter().zip(partials) {
            if rz[*b].is_empty() {
                rz[*b] = pz;
                rs[*b] = ps;
            } else {
                rz[*b].iter_mut().zip(&pz).for_each(|(a, v)| *a += v);
                rs[*b].iter_mut().zip(&ps).for_each(|(a, v)| *a += v);
            }
        }
        for b in 0..nb {
            if used[b] && rz[b].is_empty() {
                rz[b] = vec![0.0; k * d];
                rs[b] = vec![0.0; k];
            }
        }
        (rz, rs)
    }

    /// Σ over all cells of w ⊗ z (K × d) and Σ w (K), with w(j, k) = R(j, k) when one of cell j's
    /// batches is kept in cluster k, else 0.
    fn masked_sums(&self, kept: &[bool]) -> (Vec<f64>, Vec<f64>) {
        let (n, d, k) = (self.n, self.d, self.k);
        let cells: Vec<u32> = (0..n as u32).collect();
        let partials: Vec<(Vec<f64>, Vec<f64>)> = cells
            .par_chunks(CHUNK)
            .map_init(
                || (Vec::new(), Vec::new()),
                |(w, zc), cs| {
                    let w = scratch(w, cs.len() * k);
                    w.iter_mut().for_each(|v| *v = 0.0);
                    for (row, &j) in w.chunks_exact_mut(k).zip(cs) {
                        let j = j as usize;
                        let r = &self.r[j * k..(j + 1) * k];
                        let bs = self.batches.of(j);
                        for c in 0..k {
                            if bs.iter().any(|&b| kept[b as usize * k + c]) {
                                row[c] = r[c];
                            }
                        }
                    }
                    self.weighted_sums(cs, w, zc)
                },
            )
            .collect();
        let mut z_all = vec![0.0; k * d];
        let mut sums = vec![0.0; k];
        for (pz, ps) in partials {
            z_all.iter_mut().zip(&pz).for_each(|(a, v)| *a += v);
            sums.iter_mut().zip(&ps).for_each(|(a, v)| *a += v);
        }
        (z_all, sums)
    }

    /// `(wᵀ Z, Σ w)` over `cells`, `w` holding K weights per cell, Z the original embedding;
    /// `zc` is scratch space.
    fn weighted_sums(&self, cells: &[u32], w: &[f64], zc: &mut Vec<f64>) -> (Vec<f64>, Vec<f64>) {
        let (d, k) = (self.d, self.k);
        let zc = scratch(zc, cells.len() * d);
        let mut sums = vec![0.0; k];
        for ((wrow, zrow), &j) in w.chunks_exact(k).zip(zc.chunks_exact_mut(d)).zip(cells) {
            let j = j as usize;
            sums.iter_mut().zip(wrow).for_each(|(a, v)| *a += v);
            zrow.copy_from_slice(&self.x[j * d..(j + 1) * d]);
        }
        let mut out = vec![0.0; k * d];
        gemm_atb(&mut out, w, zc, cells.len(), k, d);
        (out, sums)
    }

    /// The rows of R of `cells`, gathered (cells × K) into `buf`.
    fn gather_r<'b>(&self, cells: &[u32], buf: &'b mut Vec<f64>) -> &'b mut [f64] {
        let k = self.k;
        let out = scratch(buf, cells.len() * k);
        for (row, &j) in out.chunks_exact_mut(k).zip(cells) {
            row.copy_from_slice(&self.r[j as usize * k..(j as usize + 1) * k]);
        }
        out
    }
}

/// Clusters per task when O and E are updated.
const CLUSTERS_PER_TASK: usize = 8;

/// Adds (`sign` = 1) or removes (−1) the assignments `r` (cells × K) of cells in batches `ids`
/// (cells × columns) to O and E (K × B), in parallel over ranges of clusters (each entry is summed
/// by one task, in cell order).
fn shift_block(
    r: &[f64],
    ids: &[u32],
    pr: &[f64],
    o: &mut [f64],
    e: &mut [f64],
    k: usize,
    sign: f64,
) {
    let nb = pr.len();
    o.par_chunks_mut(CLUSTERS_PER_TASK * nb)
        .zip(e.par_chunks_mut(CLUSTERS_PER_TASK * nb))
        .enumerate()
        .for_each(|(t, (o, e))| {
            let (k0, kn) = (t * CLUSTERS_PER_TASK, o.len() / nb);
            let mut delta = vec![0.0; nb * kn];
            let mut totals = vec![0.0; kn];
            block_sums(r, ids, k, k0, &mut delta, &mut totals);
            for c in 0..kn {
                for b in 0..nb {
                    o[c * nb + b] += sign * delta[b * kn + c];
                    e[c * nb + b] += sign * totals[c] * pr[b];
                }
            }
        });
}

fn check_permutation(order: &[u32]) -> Result<()> {
    let mut seen = vec![false; order.len()];
    for &j in order {
        match seen.get_mut(j as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "harmony: the update order is not a permutation of 0..{} (cell {j})",
                    order.len()
                )))
            }
        }
    }
    Ok(())
}

// ---- the per-cluster ridge system ---------------------------------------------------------------

struct Multi<'a> {
    z_all: &'a [f64],
    cov_sum: f64,
    pairs: &'a [(usize, usize, Vec<u32>)],
    pair_sums: &'a [Vec<f64>],
}

/// Cluster `cluster`'s weighted ridge regression of the original embedding on
/// [1, one-hot of the kept batches]: one row for the intercept (unpenalised) and one per kept batch
///
/// ```text
/// [ total  O_kᵀ                ]
/// [ O_k    diag(O_k + λ) + overlap ]
/// ```
///
/// The kept batches of the column with the most of them share no cells, so they form a diagonal
/// block D that is eliminated first (Schur complement on the small dense rest, as harmonypy does);
/// the rest is solved by Cholesky.
struct RidgeSystem<'a, P: Fn(usize) -> f64> {
    cluster: usize,
    keep: &'a [usize],
    var_of: &'a [usize],
    n_vars: usize,
    d: usize,
    rz: &'a [Vec<f64>],
    rs: &'a [Vec<f64>],
    penalty: P,
    multi: Option<Multi<'a>>,
}

impl<P: Fn(usize) -> f64> RidgeSystem<'_, P> {
    /// The intercept (d) and the coefficients of each kept batch (d each, in `keep` order).
    #[allow(clippy::type_complexity)]
    fn solve(&self) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
        let (c, d) = (self.cluster, self.d);
        let mut per_var = vec![0usize; self.n_vars];
        for &b in self.keep {
            per_var[self.var_of[b]] += 1;
        }
        let mut diag_var = 0;
        for v in 1..self.n_vars {
            if per_var[v] > per_var[diag_var] {
                diag_var = v;
            }
        }
        // Slot of each kept batch: Dense(x) (x >= 1, 0 is the intercept) or Diag(j).
        let mut slot: HashMap<usize, Slot> = HashMap::new();
        let (mut nd, mut m) = (1usize, 0usize);
        for &b in self.keep {
            if self.var_of[b] == diag_var {
                slot.insert(b, Slot::Diag(m));
                m += 1;
            } else {
                slot.insert(b, Slot::Dense(nd));
                nd += 1;
            }
        }
        let mut s = vec![0.0; nd * nd];
        let mut cpl = vec![0.0; nd * m];
        let mut dg = vec![0.0; m];
        let mut rhs = vec![0.0; nd * d];
        let mut rhs_diag = vec![0.0; m * d];
        let mut total = 0.0;
        for &b in self.keep {
            let o = self.rs[b][c];
            total += o;
            let coords = &self.rz[b][c * d..(c + 1) * d];
            match slot[&b] {
                Slot::Diag(j) => {
                    cpl[j] = o;
                    dg[j] = o + (self.penalty)(b);
                    rhs_diag[j * d..(j + 1) * d].copy_from_slice(coords);
                }
                Slot::Dense(x) => {
                    s[x] = o;
                    s[x * nd] = o;
                    s[x * nd + x] = o + (self.penalty)(b);
                    rhs[x * d..(x + 1) * d].copy_from_slice(coords);
                }
            }
        }
        match &self.multi {
            Some(mu) => {
                s[0] = mu.cov_sum;
                rhs[..d].copy_from_slice(mu.z_all);
                for ((a, b, _), sums) in mu.pairs.iter().zip(mu.pair_sums) {
                    let (Some(sa), Some(sb)) = (slot.get(a), slot.get(b)) else {
                        continue;
                    };
                    let overlap = sums[c];
                    match (*sa, *sb) {
                        (Slot::Dense(x), Slot::Dense(y)) => {
                            s[x * nd + y] += overlap;
                            s[y * nd + x] += overlap;
                        }
                        (Slot::Dense(x), Slot::Diag(j)) | (Slot::Diag(j), Slot::Dense(x)) => {
                            cpl[x * m + j] += overlap;
                        }
                        // Batches of one column share no cells.
                        (Slot::Diag(_), Slot::Diag(_)) => {}
                    }
                }
            }
            None => {
                s[0] = total;
                for &b in self.keep {
                    let coords = &self.rz[b][c * d..(c + 1) * d];
                    rhs[..d].iter_mut().zip(coords).for_each(|(a, v)| *a += v);
                }
            }
        }
        let largest = (0..nd).map(|x| s[x * nd + x]).fold(0.0, f64::max);
        // Eliminate the diagonal block: S −= C D⁻¹ Cᵀ, rhs −= C D⁻¹ rhs_diag.
        for j in 0..m {
            for x in 0..nd {
                let cx = cpl[x * m + j];
                if cx == 0.0 {
                    continue;
                }
                let scale = cx / dg[j];
                for y in 0..nd {
                    s[x * nd + y] -= scale * cpl[y * m + j];
                }
                for i in 0..d {
                    rhs[x * d + i] -= scale * rhs_diag[j * d + i];
                }
            }
        }
        // Cholesky S = L Lᵀ (lower triangle, in place).
        for col in 0..nd {
            let mut p = s[col * nd + col];
            for t in 0..col {
                p -= s[col * nd + t] * s[col * nd + t];
            }
            if p.is_nan() || p <= MIN_PIVOT * largest {
                return Err(Error::InvalidArgument(format!(
                    "harmony: the ridge system of cluster {c} is singular; lambda (or alpha) is zero or too small"
                )));
            }
            let l = p.sqrt();
            s[col * nd + col] = l;
            for row in col + 1..nd {
                let mut v = s[row * nd + col];
                for t in 0..col {
                    v -= s[row * nd + t] * s[col * nd + t];
                }
                s[row * nd + col] = v / l;
            }
        }
        // L Lᵀ W = rhs, all d columns at once (row x of rhs becomes row x of W).
        for x in 0..nd {
            for t in 0..x {
                let f = s[x * nd + t];
                if f != 0.0 {
                    for i in 0..d {
                        rhs[x * d + i] -= f * rhs[t * d + i];
                    }
                }
            }
            let l = s[x * nd + x];
            rhs[x * d..(x + 1) * d].iter_mut().for_each(|v| *v /= l);
        }
        for x in (0..nd).rev() {
            for t in x + 1..nd {
                let f = s[t * nd + x];
                if f != 0.0 {
                    for i in 0..d {
                        rhs[x * d + i] -= f * rhs[t * d + i];
                    }
                }
            }
            let l = s[x * nd + x];
            rhs[x * d..(x + 1) * d].iter_mut().for_each(|v| *v /= l);
        }
        let dirs = self
            .keep
            .iter()
            .map(|b| match slot[b] {
                Slot::Dense(x) => rhs[x * d..(x + 1) * d].to_vec(),
                Slot::Diag(j) => {
                    let mut w = rhs_diag[j * d..(j + 1) * d].to_vec();
                    for x in 0..nd {
                        let cx = cpl[x * m + j];
                        if cx != 0.0 {
                            w.iter_mut()
                                .zip(&rhs[x * d..(x + 1) * d])
                                .for_each(|(a, v)| *a -= cx * v);
                        }
                    }
                    w.iter_mut().for_each(|v| *v /= dg[j]);
                    w
                }
            })
            .collect();
        Ok((rhs[..d].to_vec(), dirs))
    }
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Dense(usize),
    Diag(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<String>, Vec<String>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(n * d);
        let (mut plate, mut donor) = (Vec::new(), Vec::new());
        for i in 0..n {
            let (t, p, q) = (i % 3, rng.gen_range(0..3), rng.gen_range(0..2));
            for c in 0..d {
                let centre = if c == t { 4.0 } else { 0.0 };
                let shift = if c == (p + 1) % d { 1.5 } else { 0.0 } + q as f64 * 0.5;
                x.push(centre + shift + rng.gen::<f64>() - 0.5);
            }
            plate.push(format!("plate{p}"));
            donor.push(format!("donor{q}"));
        }
        (x, plate, donor)
    }

    #[test]
    fn default_nclust_rounds_like_python() {
        assert_eq!(default_nclust(14), 0);
        assert_eq!(default_nclust(15), 0); // round(0.5) = 0
        assert_eq!(default_nclust(45), 2); // round(1.5) = 2
        assert_eq!(default_nclust(75), 2); // round(2.5) = 2
        assert_eq!(default_nclust(600), 20);
        assert_eq!(default_nclust(1_000_000), 100);
    }

    #[test]
    fn batches_are_numbered_in_sorted_order_per_column() {
        let cols = vec![vec!["b", "a", "c", "a"], vec!["y", "x", "x", "y"]];
        let b = factorize(&cols, 4).unwrap();
        assert_eq!(b.ids, vec![1, 4, 0, 3, 2, 3, 0, 4]);
        assert_eq!(b.var_of, vec![0, 0, 0, 1, 1]);
        assert_eq!(b.members[0], vec![1, 3]);
        let pairs: Vec<(usize, usize, Vec<u32>)> = b.pairs.clone();
        assert_eq!(
            pairs,
            vec![
                (1, 4, vec![0]),
                (0, 3, vec![1]),
                (2, 3, vec![2]),
                (0, 4, vec![3])
            ]
        );
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_culprit() {
        let (mut x, plate, _) = blobs(60, 4, 1);
        let cols = [plate.clone()];
        let o = HarmonyOptions::default();
        let err = |r: Result<HarmonyResult>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(harmony(&x, 60, 5, &cols, &o, None)).contains("expected shape"));
        assert!(err(harmony(&x, 60, 4, &[plate[..59].to_vec()], &o, None)).contains("59 labels"));
        let mut empty = plate.clone();
        empty[7] = String::new();
        assert!(err(harmony(&x, 60, 4, &[empty], &o, None)).contains("row 7"));
        let none: [Vec<String>; 0] = [];
        assert!(err(harmony(&x, 60, 4, &none, &o, None)).contains("no batch column"));
        let big = HarmonyOptions {
            nclust: Some(61),
            ..Default::default()
        };
        assert!(err(harmony(&x, 60, 4, &cols, &big, None)).contains("nclust"));
        let few = [vec!["a".to_string(); 10]];
        assert!(err(harmony(&x[..40], 10, 4, &few, &o, None)).contains("set nclust"));
        for bad in [
            HarmonyOptions {
                sigma: 0.0,
                ..Default::default()
            },
            HarmonyOptions {
                block_size: 0.0,
                ..Default::default()
            },
            HarmonyOptions {
                lambda: Some(f64::NAN),
                ..Default::default()
            },
            HarmonyOptions {
                theta: -1.0,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                harmony(&x, 60, 4, &cols, &bad, None),
                Err(Error::InvalidArgument(_))
            ));
        }
        x[2 * 4 + 3] = f64::INFINITY;
        let e = harmony(&x, 60, 4, &cols, &o, None).unwrap_err();
        assert!(
            matches!(e, Error::NonFinite(_)) && e.to_string().contains("row 2, column 3"),
            "{e}"
        );
    }

    #[test]
    fn progress_reports_and_cancels() {
        let (x, plate, _) = blobs(90, 4, 2);
        let opts = HarmonyOptions {
            epsilon_harmony: -1.0,
            max_iter_harmony: 3,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut record = |done: usize, total: usize| {
            seen.push((done, total));
            true
        };
        let r = harmony(
            &x,
            90,
            4,
            std::slice::from_ref(&plate),
            &opts,
            Some(&mut record),
        )
        .unwrap();
        assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
        assert_eq!((r.iterations, r.converged), (3, false));
        let mut stop = |done: usize, _: usize| done < 2;
        let e = harmony(&x, 90, 4, &[plate], &opts, Some(&mut stop));
        assert_eq!(e, Err(Error::Cancelled));
    }

    #[test]
    fn nothing_to_correct_leaves_the_input() {
        let (x, plate, _) = blobs(90, 4, 3);
        let one = [vec!["all".to_string(); 90]];
        let r = harmony(&x, 90, 4, &one, &HarmonyOptions::default(), None).unwrap();
        assert_eq!(r.corrected, x);
        let zero = HarmonyOptions {
            max_iter_harmony: 0,
            ..Default::default()
        };
        let r = harmony(&x, 90, 4, &[plate], &zero, None).unwrap();
        assert_eq!((r.corrected, r.iterations), (x, 0));
        for row in r.assignments.chunks_exact(r.nclust) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }

    /// The last iteration's correction equals the closed-form weighted ridge regression of each
    /// cluster, solved densely: (Xᵀ W X + diag(0, λ…)) B = Xᵀ W Z with X = [1, one-hots of both
    /// columns], W = diag(R[:, k]) — checks the Schur elimination, overlaps and intercept handling.
    #[test]
    fn correction_is_the_weighted_ridge_regression() {
        let (n, d) = (240, 5);
        let (x, plate, donor) = blobs(n, d, 4);
        let cols = [plate, donor];
        for lambda in [Some(1.0), Some(0.3)] {
            let opts = HarmonyOptions {
                lambda,
                nclust: Some(6),
                max_iter_harmony: 2,
                epsilon_harmony: -1.0,
                ..Default::default()
            };
            let res = harmony(&x, n, d, &cols, &opts, None).unwrap();
            let b = factorize(&cols, n).unwrap();
            let (k, nb) = (res.nclust, b.count());
            let p = 1 + nb;
            let mut expected = x.clone();
            for c in 0..k {
                let mut a = vec![0.0; p * p];
                let mut rhs = vec![0.0; p * d];
                for j in 0..n {
                    let w = res.assignments[j * k + c];
                    let mut row = vec![0.0; p];
                    row[0] = 1.0;
                    for &bb in b.of(j) {
                        row[1 + bb as usize] = 1.0;
                    }
                    for s in 0..p {
                        for t in 0..p {
                            a[s * p + t] += w * row[s] * row[t];
                        }
                        for i in 0..d {
                            rhs[s * d + i] += w * row[s] * x[j * d + i];
                        }
                    }
                }
                for s in 1..p {
                    a[s * p + s] += lambda.unwrap();
                }
                let coef = dense_solve(a, rhs, p, d);
                let intercept = &coef[..d];
                let norm = intercept.iter().map(|v| v * v).sum::<f64>().sqrt();
                for (y, w) in res.centroids[c * d..(c + 1) * d].iter().zip(intercept) {
                    assert!((y - w / norm).abs() < 1e-10);
                }
                for j in 0..n {
                    let w = res.assignments[j * k + c];
                    for &bb in b.of(j) {
                        for i in 0..d {
                            expected[j * d + i] -= w * coef[(1 + bb as usize) * d + i];
                        }
                    }
                }
            }
            let diff = res
                .corrected
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(diff < 1e-10, "{diff}");
            let moved = res
                .corrected
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(moved > 0.1, "{moved}");
        }
    }

    /// Gaussian elimination with partial pivoting: A (p × p) X = B (p × d).
    fn dense_solve(mut a: Vec<f64>, mut b: Vec<f64>, p: usize, d: usize) -> Vec<f64> {
        for col in 0..p {
            let piv = (col..p)
                .max_by(|&r, &s| a[r * p + col].abs().total_cmp(&a[s * p + col].abs()))
                .unwrap();
            for t in 0..p {
                a.swap(col * p + t, piv * p + t);
            }
            for t in 0..d {
                b.swap(col * d + t, piv * d + t);
            }
            for r in 0..p {
                if r != col {
                    let f = a[r * p + col] / a[col * p + col];
                    for t in 0..p {
                        a[r * p + t] -= f * a[col * p + t];
                    }
                    for t in 0..d {
                        b[r * d + t] -= f * b[col * d + t];
                    }
                }
            }
        }
        for r in 0..p {
            for t in 0..d {
                b[r * d + t] /= a[r * p + r];
            }
        }
        b
    }
}
