//! Retrieval metrics on treatment profiles with multi-label annotations (REFERENCE §7): mean
//! average precision in three conventions, precision@k / recall@k, replicate reproducibility.
//!
//! Queries and libraries (CP-CNN paper): an item is a query when it shares at least one label with
//! at least `min_positives` other items; its library is every other item; a hit (positive) shares
//! at least one label with it. Items without labels are never queries; by default they stay in the
//! library as negatives (`Unlabeled::Negatives`). DeepProfilerExperiments evaluates annotated
//! treatments only (its notebooks drop unannotated rows before building the similarity matrix):
//! `Unlabeled::Drop` does the same on a table that still holds them.
//!
//! Similarities are cosine, computed block by block (`CosineSimilarity`): memory O(block × N).

use super::pvalues::{
    ap_null_sorted, average_precision_from_ranks, benjamini_hochberg, permutation_p_value,
};
use super::similarity::{check_percentile, CosineSimilarity, PairStream, Progress};
use super::Labels;
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What happens to items without labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unlabeled {
    /// They stay in every library as negatives (never queries).
    #[default]
    Negatives,
    /// They are left out entirely, as if the table held annotated items only
    /// (DeepProfilerExperiments' evaluation).
    Drop,
}

/// Queries, libraries and positives for a label assignment.
#[derive(Clone, Debug)]
pub struct QuerySet {
    /// Whether each item takes part (all items, or the labelled ones with `Unlabeled::Drop`).
    pub in_library: Vec<bool>,
    /// Items taking part (N of the recall axes).
    pub universe: usize,
    /// Positives of each item among the other items taking part.
    pub n_positives: Vec<usize>,
    /// Whether each item is a query.
    pub is_query: Vec<bool>,
    /// The queries, in increasing order.
    pub queries: Vec<usize>,
    /// Items taking part, per label id.
    members: Vec<Vec<u32>>,
}

impl QuerySet {
    /// Queries are labelled items with at least `min_positives` (≥ 1) positives.
    pub fn new(labels: &Labels, unlabeled: Unlabeled, min_positives: usize) -> Result<QuerySet> {
        let n = labels.len();
        if n >= u32::MAX as usize {
            return Err(Error::Shape(format!(
                "{n} items: at most {} supported",
                u32::MAX - 1
            )));
        }
        if min_positives == 0 {
            return Err(Error::InvalidArgument(
                "min_positives must be at least 1".into(),
            ));
        }
        let in_library: Vec<bool> = (0..n)
            .map(|i| unlabeled == Unlabeled::Negatives || !labels.items[i].is_empty())
            .collect();
        let mut members = vec![Vec::new(); labels.names.len()];
        for (i, items) in labels.items.iter().enumerate() {
            if in_library[i] {
                for &l in items {
                    members[l as usize].push(i as u32);
                }
            }
        }
        let n_positives: Vec<usize> = crate::threads::install(|| {
            (0..n)
                .into_par_iter()
                .map_init(
                    || vec![0u32; n],
                    |marks, i| {
                        let stamp = i as u32 + 1;
                        let mut count = 0;
                        for &l in &labels.items[i] {
                            for &j in &members[l as usize] {
                                let j = j as usize;
                                if j != i && marks[j] != stamp {
                                    marks[j] = stamp;
                                    count += 1;
                                }
                            }
                        }
                        count
                    },
                )
                .collect()
        });
        let is_query: Vec<bool> = (0..n).map(|i| n_positives[i] >= min_positives).collect();
        let queries = (0..n).filter(|&i| is_query[i]).collect();
        Ok(QuerySet {
            universe: in_library.iter().filter(|&&b| b).count(),
            in_library,
            n_positives,
            is_query,
            queries,
            members,
        })
    }

    /// Items each query is ranked against (all others taking part).
    pub fn library_size(&self) -> usize {
        self.universe.saturating_sub(1)
    }

    /// Marks the positives of query `q` with `stamp` in `marks` and lists them in `out`.
    pub(crate) fn positives(
        &self,
        labels: &Labels,
        q: usize,
        marks: &mut [u32],
        out: &mut Vec<usize>,
    ) {
        let stamp = q as u32 + 1;
        out.clear();
        for &l in &labels.items[q] {
            for &j in &self.members[l as usize] {
                let j = j as usize;
                if j != q && marks[j] != stamp {
                    marks[j] = stamp;
                    out.push(j);
                }
            }
        }
    }

    /// Whether library item `j` of query `q` is a negative (after `positives` marked `q`'s).
    #[inline]
    pub(crate) fn is_negative(&self, q: usize, j: usize, marks: &[u32]) -> bool {
        j != q && self.in_library[j] && marks[j] != q as u32 + 1
    }
}

/// How average precision is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapMethod {
    /// The CP-CNN paper: interpolated precision p(r) = max over recall r' ≥ r of the precision at
    /// a similarity threshold (tied similarities form one threshold), averaged over a recall axis of
    /// `recall_points` evenly spaced points from 0 to 1.
    #[default]
    Interpolated,
    /// DeepProfilerExperiments' `interpolated_precision_recall_curve` exactly: each query's row of
    /// the N × N matrix with itself as a negative of similarity −1, scikit-learn's
    /// `precision_recall_curve`, a running maximum from the lowest threshold, read off the recall
    /// axis `linspace(0, 1, N)` (N = items taking part) with its one-step lag; queries need ≥ 2
    /// positives (its code clears the diagonal before counting matches).
    DeepProfiler,
    /// copairs: AP = Σ over positives of precision at the positive's rank / #positives, similarity
    /// ties broken in favour of positives (similarities compared in float32 as copairs stores them,
    /// see `copairs_float32`); with `null_size` > 0, permutation p-values and Benjamini–Hochberg
    /// q-values.
    Copairs,
}

/// Options of `mean_average_precision`.
#[derive(Clone, Debug)]
pub struct MapOptions {
    pub method: MapMethod,
    /// Interpolated: points of the recall axis; 0 = N, the number of items taking part.
    pub recall_points: usize,
    /// DeepProfiler: scikit-learn before 1.1, whose `precision_recall_curve` stopped at the first
    /// threshold reaching full recall (changes the first point of the curve).
    pub sklearn_before_1_1: bool,
    /// Minimum positives for a query; 0 = the method's default (DeepProfiler 2, others 1).
    pub min_positives: usize,
    pub unlabeled: Unlabeled,
    /// Copairs: random rankings per (#positives, library size) configuration; 0 = no p-values.
    pub null_size: usize,
    /// Copairs: rank as copairs 0.5.5 does, by 1 − s in float32 of the similarity s stored as
    /// float32 (values that collide in float32 tie, and ties favour positives); false ranks by the
    /// float64 similarities. Default true.
    pub copairs_float32: bool,
    pub seed: u64,
    /// Query rows per similarity block; 0 = automatic (about 32 MiB of similarities per block).
    pub block_rows: usize,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            method: MapMethod::Interpolated,
            recall_points: 0,
            sklearn_before_1_1: false,
            min_positives: 0,
            unlabeled: Unlabeled::Negatives,
            null_size: 0,
            copairs_float32: true,
            seed: 0,
            block_rows: 0,
        }
    }
}

/// copairs' ranking key (higher ranks first): −(1 − f32(s)) computed in float32, as its
/// `np.lexsort([1 - sim_all, ix])` on float32 similarities.
fn copairs_key(s: f64) -> f64 {
    -((1.0f32 - s as f32) as f64)
}

/// A precision–recall curve on a recall axis (recall increasing).
#[derive(Clone, Debug, PartialEq)]
pub struct PrCurve {
    pub recall: Vec<f64>,
    pub precision: Vec<f64>,
}

/// Result of `mean_average_precision`. Per-item vectors have one entry per item, NaN for items
/// that are not queries.
#[derive(Clone, Debug)]
pub struct MapResult {
    /// Mean AP over the queries (NaN when there is none).
    pub mean: f64,
    pub per_query: Vec<f64>,
    /// Positives of every item (queries or not) in its library.
    pub n_positives: Vec<usize>,
    pub n_queries: usize,
    /// Items each query is ranked against.
    pub library_size: usize,
    /// Copairs with null_size > 0: (#null APs ≥ AP + 1) / (null_size + 1).
    pub p_values: Option<Vec<f64>>,
    /// Benjamini–Hochberg q-values of `p_values` over the queries.
    pub q_values: Option<Vec<f64>>,
    /// Interpolated and DeepProfiler: the mean over queries of their interpolated precision on the
    /// method's recall axis.
    pub curve: Option<PrCurve>,
}

/// Per-query ranking summary: positive similarities grouped into distinct levels (descending),
/// and the negatives counted against them.
#[derive(Default)]
struct Ranking {
    psims: Vec<f64>,
    /// Distinct positive similarities, descending, and how many positives have each.
    level_score: Vec<f64>,
    level_count: Vec<u64>,
    /// gap[k]: negatives strictly between level k − 1 and level k (gap[0] above all, gap[K] below
    /// all); tie[k]: negatives equal to level k.
    gap: Vec<u64>,
    tie: Vec<u64>,
    n_pos: u64,
}

impl Ranking {
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        row: &[f64],
        q: usize,
        set: &QuerySet,
        marks: &[u32],
        pos: &[usize],
        extra_negative: Option<f64>,
        key: impl Fn(f64) -> f64,
    ) {
        self.psims.clear();
        self.psims.extend(pos.iter().map(|&j| key(row[j])));
        self.psims.sort_unstable_by(|a, b| b.total_cmp(a));
        self.level_score.clear();
        self.level_count.clear();
        for &s in &self.psims {
            if let (Some(&last), Some(count)) =
                (self.level_score.last(), self.level_count.last_mut())
            {
                if last == s {
                    *count += 1;
                    continue;
                }
            }
            {
                self.level_score.push(s);
                self.level_count.push(1);
            }
        }
        let k = self.level_score.len();
        self.gap.clear();
        self.gap.resize(k + 1, 0);
        self.tie.clear();
        self.tie.resize(k, 0);
        self.n_pos = pos.len() as u64;
        let levels = &self.level_score;
        let mut classify = |s: f64| {
            let t = levels.partition_point(|&v| v > s);
            if t < k && levels[t] == s {
                self.tie[t] += 1;
            } else {
                self.gap[t] += 1;
            }
        };
        for (j, &s) in row.iter().enumerate() {
            if set.is_negative(q, j, marks) {
                classify(key(s));
            }
        }
        if let Some(s) = extra_negative {
            classify(s);
        }
    }

    /// copairs AP: positive i (0-based, descending similarity) sits at rank i + the negatives
    /// strictly more similar than it.
    fn ap_copairs(&self) -> f64 {
        let mut ahead = 0u64;
        let mut i = 0u64;
        let mut ranks = Vec::with_capacity(self.n_pos as usize);
        for (lvl, &c) in self.level_count.iter().enumerate() {
            ahead += self.gap[lvl];
            for _ in 0..c {
                ranks.push((i + ahead) as usize);
                i += 1;
            }
            ahead += self.tie[lvl];
        }
        average_precision_from_ranks(ranks)
    }

    /// For each level k: (recall, precision at the level's threshold, precision at the lowest
    /// threshold with the same recall) — the points of the distinct-threshold PR curve that matter.
    fn levels(&self) -> Vec<(f64, f64, f64)> {
        let mut out = Vec::with_capacity(self.level_count.len());
        let (mut tp, mut fp) = (0u64, 0u64);
        let n_pos = self.n_pos as f64;
        for (lvl, &c) in self.level_count.iter().enumerate() {
            tp += c;
            fp += self.gap[lvl] + self.tie[lvl];
            let p = tp as f64 / (tp + fp) as f64;
            let below = self.gap[lvl + 1];
            let lowest = if below > 0 {
                tp as f64 / (tp + fp + below) as f64
            } else {
                p
            };
            out.push((tp as f64 / n_pos, p, lowest));
        }
        out
    }
}

/// Shared recall axes.
struct Axis {
    /// Ascending values, numpy `linspace(0, 1, len)`: i · (1 / (len − 1)), the last exactly 1.
    asc: Vec<f64>,
}

impl Axis {
    fn linspace(len: usize) -> Axis {
        let step = 1.0 / (len - 1) as f64;
        let mut asc: Vec<f64> = (0..len).map(|i| i as f64 * step).collect();
        asc[len - 1] = 1.0;
        Axis { asc }
    }
}

/// Adds `v` to curve entries [a, b) through a difference array.
fn add_range(diff: &mut [f64], a: usize, b: usize, v: f64) {
    if a < b {
        diff[a] += v;
        diff[b] -= v;
    }
}

/// DeepProfilerExperiments' per-query AP (mean of its interpolated precision over the recall
/// axis); adds the query's interpolated precision (indexed like its descending axis) to `diff`.
fn ap_deepprofiler(
    levels: &[(f64, f64, f64)],
    negatives_on_top: bool,
    axis: &Axis,
    legacy: bool,
    diff: &mut [f64],
) -> f64 {
    let n = axis.asc.len();
    // cge(ρ) = #{i in 0..n−1 : a_i ≥ ρ}, a_i = asc[n − 1 − i] (descending axis).
    let cge = |rho: f64| (n - 1) - axis.asc[1..].partition_point(|&a| a < rho);
    let k = levels.len();
    let mut sum = 0.0;
    let mut best_p = f64::NEG_INFINITY; // max precision over the levels of higher recall
    let mut upper = 0usize; // cge(ρ of the level above in recall)
    let mut first_mp = f64::NAN;
    for lvl in (0..k).rev() {
        let (rho, p, lowest) = levels[lvl];
        let first = if legacy && lvl == k - 1 { p } else { lowest };
        let mp = best_p.max(first);
        if lvl == k - 1 {
            first_mp = mp;
        }
        let c = cge(rho);
        sum += (c - upper) as f64 * mp;
        add_range(diff, upper + 1, c + 1, mp);
        upper = c;
        best_p = best_p.max(p);
    }
    // Axis points below the smallest recall read the first point of recall 0: a threshold above
    // every positive (precision 0) when negatives rank first, else sklearn's final (0, 1) point.
    let bottom = if negatives_on_top {
        best_p.max(0.0)
    } else {
        1.0
    };
    sum += ((n - 1) - upper) as f64 * bottom;
    add_range(diff, upper + 1, n, bottom);
    add_range(diff, 0, 1, first_mp);
    (first_mp + sum) / n as f64
}

/// The paper's interpolated AP on an ascending axis; adds the query's curve to `diff`.
fn ap_interpolated(levels: &[(f64, f64, f64)], axis: &Axis, diff: &mut [f64]) -> f64 {
    let r = axis.asc.len();
    let cle = |rho: f64| axis.asc.partition_point(|&a| a <= rho);
    // Suffix maxima: p_interp(a) = max over levels with recall ≥ a.
    let mut suffix = vec![0.0; levels.len()];
    let mut m = f64::NEG_INFINITY;
    for (lvl, &(_, p, _)) in levels.iter().enumerate().rev() {
        m = m.max(p);
        suffix[lvl] = m;
    }
    let mut sum = 0.0;
    let mut prev = 0usize;
    for (lvl, &(rho, _, _)) in levels.iter().enumerate() {
        let c = cle(rho);
        sum += (c - prev) as f64 * suffix[lvl];
        add_range(diff, prev, c, suffix[lvl]);
        prev = c;
    }
    sum / r as f64
}

/// Mean average precision of cosine-similarity retrieval (see `MapMethod`).
pub fn mean_average_precision(
    sim: &CosineSimilarity,
    labels: &Labels,
    opts: &MapOptions,
    mut progress: Progress,
) -> Result<MapResult> {
    check_items(sim, labels)?;
    let min_pos = match (opts.min_positives, opts.method) {
        (0, MapMethod::DeepProfiler) => 2,
        (0, _) => 1,
        (m, _) => m,
    };
    let set = QuerySet::new(labels, opts.unlabeled, min_pos)?;
    let n = sim.n();
    let axis = match opts.method {
        MapMethod::Copairs => None,
        MapMethod::DeepProfiler => Some(Axis::linspace(set.universe.max(2))),
        MapMethod::Interpolated => {
            let r = if opts.recall_points == 0 {
                set.universe
            } else {
                opts.recall_points
            };
            if r < 2 {
                return Err(Error::InvalidArgument(format!(
                    "recall axis of {r} points: need at least 2 (recall_points = {})",
                    opts.recall_points
                )));
            }
            Some(Axis::linspace(r))
        }
    };
    let curve_len = axis.as_ref().map_or(0, |a| a.asc.len());
    let method = opts.method;
    let legacy = opts.sklearn_before_1_1;
    let copairs_f32 = method == MapMethod::Copairs && opts.copairs_float32;
    let confs: BTreeSet<usize> = set.queries.iter().map(|&q| set.n_positives[q]).collect();
    let with_null = method == MapMethod::Copairs && opts.null_size > 0;
    let total = set.queries.len() + if with_null { confs.len() } else { 0 };

    let mut per_query = vec![f64::NAN; n];
    let mut diff = vec![0.0; curve_len + 1];
    sim.for_each_block(
        &set.queries,
        opts.block_rows,
        &mut progress,
        0,
        total,
        |blk, sims| {
            let mut marks = vec![0u32; n];
            let mut pos = Vec::new();
            let mut ranking = Ranking::default();
            let mut block_diff = vec![0.0; curve_len + 1];
            let aps: Vec<f64> = blk
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    let row = &sims[i * n..(i + 1) * n];
                    set.positives(labels, q, &mut marks, &mut pos);
                    let extra = (method == MapMethod::DeepProfiler).then_some(-1.0);
                    if copairs_f32 {
                        ranking.build(row, q, &set, &marks, &pos, extra, copairs_key);
                    } else {
                        ranking.build(row, q, &set, &marks, &pos, extra, |s| s);
                    }
                    match (method, &axis) {
                        (MapMethod::Copairs, _) => ranking.ap_copairs(),
                        (MapMethod::DeepProfiler, Some(ax)) => ap_deepprofiler(
                            &ranking.levels(),
                            ranking.gap[0] > 0,
                            ax,
                            legacy,
                            &mut block_diff,
                        ),
                        (_, Some(ax)) => ap_interpolated(&ranking.levels(), ax, &mut block_diff),
                        (_, None) => f64::NAN,
                    }
                })
                .collect();
            (blk.to_vec(), aps, block_diff)
        },
        |(blk, aps, block_diff)| {
            for (q, ap) in blk.into_iter().zip(aps) {
                per_query[q] = ap;
            }
            diff.iter_mut().zip(block_diff).for_each(|(a, b)| *a += b);
        },
    )?;

    let n_queries = set.queries.len();
    let mean = if n_queries == 0 {
        f64::NAN
    } else {
        set.queries.iter().map(|&q| per_query[q]).sum::<f64>() / n_queries as f64
    };
    let curve = axis.map(|ax| {
        let mut acc = 0.0;
        let mut precision: Vec<f64> = diff[..curve_len]
            .iter()
            .map(|d| {
                acc += d;
                acc / n_queries as f64
            })
            .collect();
        if method == MapMethod::DeepProfiler {
            precision.reverse(); // its curve runs down the descending axis
        }
        PrCurve {
            recall: ax.asc,
            precision,
        }
    });

    let (mut p_values, mut q_values) = (None, None);
    if with_null {
        // Nulls of a wave of configurations in parallel, used and dropped before the next wave.
        let library = set.library_size();
        let mut by_conf: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &q in &set.queries {
            by_conf.entry(set.n_positives[q]).or_default().push(q);
        }
        let confs: Vec<(&usize, &Vec<usize>)> = by_conf.iter().collect();
        let wave = 4 * crate::threads::num_threads().max(1);
        let mut p = vec![f64::NAN; n];
        let mut done = n_queries;
        for group in confs.chunks(wave) {
            let pv: Vec<Vec<(usize, f64)>> = crate::threads::install(|| {
                group
                    .par_iter()
                    .map(|&(&k, qs)| {
                        let null = ap_null_sorted(k, library, opts.null_size, opts.seed);
                        qs.iter()
                            .map(|&q| (q, permutation_p_value(&null, per_query[q])))
                            .collect()
                    })
                    .collect()
            });
            pv.into_iter().flatten().for_each(|(q, v)| p[q] = v);
            done += group.len();
            if let Some(cb) = progress.as_mut() {
                if !cb(done, total) {
                    return Err(Error::Cancelled);
                }
            }
        }
        q_values = Some(benjamini_hochberg(&p));
        p_values = Some(p);
    }
    Ok(MapResult {
        mean,
        per_query,
        n_positives: set.n_positives.clone(),
        n_queries,
        library_size: set.library_size(),
        p_values,
        q_values,
        curve,
    })
}

pub(crate) fn check_items(sim: &CosineSimilarity, labels: &Labels) -> Result<()> {
    if labels.len() != sim.n() {
        return Err(Error::Shape(format!(
            "labels: {} entries for {} profiles",
            labels.len(),
            sim.n()
        )));
    }
    Ok(())
}

/// Options of `precision_recall_at_k`.
#[derive(Clone, Debug, Default)]
pub struct AtKOptions {
    /// Minimum positives for a query; 0 = 1.
    pub min_positives: usize,
    pub unlabeled: Unlabeled,
    pub block_rows: usize,
}

/// precision@k and recall@k per query. Matrices are n × ks.len(), row-major, NaN rows for
/// non-queries; means are over queries, one per k.
#[derive(Clone, Debug)]
pub struct AtKResult {
    pub ks: Vec<usize>,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub mean_precision: Vec<f64>,
    pub mean_recall: Vec<f64>,
    pub n_queries: usize,
}

/// precision@k = hits among the k most similar library items / k; recall@k = those hits /
/// #positives. Ties in similarity are ordered by item index (lower first). Every k must be in
/// 1..=library size.
pub fn precision_recall_at_k(
    sim: &CosineSimilarity,
    labels: &Labels,
    ks: &[usize],
    opts: &AtKOptions,
    mut progress: Progress,
) -> Result<AtKResult> {
    check_items(sim, labels)?;
    let set = QuerySet::new(labels, opts.unlabeled, opts.min_positives.max(1))?;
    let lib = set.library_size();
    if ks.is_empty() {
        return Err(Error::InvalidArgument("no k given".into()));
    }
    if let Some(&k) = ks.iter().find(|&&k| k == 0 || k > lib) {
        return Err(Error::InvalidArgument(format!(
            "k = {k}: must be between 1 and the library size {lib}"
        )));
    }
    let kmax = *ks.iter().max().unwrap_or(&1);
    let n = sim.n();
    let nk = ks.len();
    let mut precision = vec![f64::NAN; n * nk];
    let mut recall = vec![f64::NAN; n * nk];
    sim.for_each_block(
        &set.queries,
        opts.block_rows,
        &mut progress,
        0,
        set.queries.len(),
        |blk, sims| {
            let mut marks = vec![0u32; n];
            let mut pos = Vec::new();
            let mut items: Vec<(f64, u32)> = Vec::with_capacity(n);
            let mut out = Vec::with_capacity(blk.len());
            for (i, &q) in blk.iter().enumerate() {
                let row = &sims[i * n..(i + 1) * n];
                set.positives(labels, q, &mut marks, &mut pos);
                items.clear();
                items.extend(
                    (0..n)
                        .filter(|&j| j != q && set.in_library[j])
                        .map(|j| (row[j], j as u32)),
                );
                let order =
                    |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
                if kmax < items.len() {
                    items.select_nth_unstable_by(kmax - 1, order);
                }
                items[..kmax].sort_unstable_by(order);
                let stamp = q as u32 + 1;
                let mut hits = vec![0usize; kmax + 1];
                for (r, &(_, j)) in items[..kmax].iter().enumerate() {
                    hits[r + 1] = hits[r] + (marks[j as usize] == stamp) as usize;
                }
                let np = pos.len() as f64;
                let p: Vec<f64> = ks.iter().map(|&k| hits[k] as f64 / k as f64).collect();
                let rc: Vec<f64> = ks.iter().map(|&k| hits[k] as f64 / np).collect();
                out.push((q, p, rc));
            }
            out
        },
        |rows| {
            for (q, p, rc) in rows {
                precision[q * nk..(q + 1) * nk].copy_from_slice(&p);
                recall[q * nk..(q + 1) * nk].copy_from_slice(&rc);
            }
        },
    )?;
    let nq = set.queries.len();
    let mean = |m: &[f64]| -> Vec<f64> {
        (0..nk)
            .map(|c| set.queries.iter().map(|&q| m[q * nk + c]).sum::<f64>() / nq as f64)
            .collect()
    };
    Ok(AtKResult {
        ks: ks.to_vec(),
        mean_precision: mean(&precision),
        mean_recall: mean(&recall),
        precision,
        recall,
        n_queries: nq,
    })
}

/// Options of `replicate_reproducibility`.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// Percentile of the non-replicate similarities used as threshold (default 95).
    pub percentile: f64,
    pub block_rows: usize,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            percentile: 95.0,
            block_rows: 0,
        }
    }
}

/// Result of `replicate_reproducibility`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicateResult {
    /// Fraction of replicate pairs more similar than `threshold`.
    pub fraction: f64,
    /// The percentile of the non-replicate pair similarities.
    pub threshold: f64,
    pub n_replicate_pairs: u64,
    pub n_non_replicate_pairs: u64,
}

/// Replicate reproducibility as cytominer-eval computes it: over all pairs i < j, replicate pairs
/// share a (non-empty) group; threshold = numpy-linear percentile of the non-replicate pairs'
/// cosine similarities; result = fraction of replicate pairs with similarity > threshold. Items
/// with an empty group are in no replicate pair (but in non-replicate pairs). Exact in memory
/// O(block × N) (several passes when there are more than 2^23 pairs).
pub fn replicate_reproducibility<S: AsRef<str>>(
    sim: &CosineSimilarity,
    groups: &[S],
    opts: &ReplicateOptions,
    mut progress: Progress,
) -> Result<ReplicateResult> {
    let n = sim.n();
    if groups.len() != n {
        return Err(Error::Shape(format!(
            "groups: {} entries for {n} profiles",
            groups.len()
        )));
    }
    check_percentile(opts.percentile, "percentile")?;
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let gid: Vec<u32> = groups
        .iter()
        .map(|g| {
            let g = g.as_ref().trim();
            if g.is_empty() {
                u32::MAX
            } else {
                let next = ids.len() as u32;
                *ids.entry(g).or_insert(next)
            }
        })
        .collect();
    let mut sizes = vec![0u64; ids.len()];
    gid.iter()
        .filter(|&&g| g != u32::MAX)
        .for_each(|&g| sizes[g as usize] += 1);
    let replicate_pairs: u64 = sizes.iter().map(|&s| s * s.saturating_sub(1) / 2).sum();
    let all_pairs = (n as u64) * (n as u64).saturating_sub(1) / 2;
    if replicate_pairs == 0 {
        return Err(Error::InvalidArgument(
            "no replicate pairs: every group has a single item".into(),
        ));
    }
    if replicate_pairs == all_pairs {
        return Err(Error::InvalidArgument(
            "no non-replicate pairs: all items are in one group".into(),
        ));
    }
    let rows: Vec<usize> = (0..n - 1).collect();
    let stream = PairStream {
        sim,
        rows: &rows,
        block_rows: opts.block_rows,
        visit: |i: usize, row: &[f64], emit: &mut dyn FnMut(f64, usize)| {
            let gi = gid[i];
            for j in i + 1..row.len() {
                emit(row[j], (gi != u32::MAX && gid[j] == gi) as usize);
            }
        },
    };
    let (threshold, counts) =
        stream.percentile_and_counts([true, false], opts.percentile, all_pairs, &mut progress)?;
    Ok(ReplicateResult {
        fraction: counts.above[1] as f64 / replicate_pairs as f64,
        threshold,
        n_replicate_pairs: replicate_pairs,
        n_non_replicate_pairs: all_pairs - replicate_pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Profiles whose cosine similarities to profile 0 are exactly the given values (2-D unit
    /// vectors (s, √(1−s²)) against (1, 0)), plus the rest of the matrix whatever it is.
    fn line_profiles(sims: &[f64]) -> (CosineSimilarity, usize) {
        let mut x = vec![1.0, 0.0];
        for &s in sims {
            x.push(s);
            x.push((1.0 - s * s).sqrt());
        }
        let n = sims.len() + 1;
        (CosineSimilarity::new(&x, n, 2).unwrap(), n)
    }

    #[test]
    fn copairs_ap_breaks_ties_for_positives() {
        // query 0 (label a); library sims 0.9 (neg), 0.5 (pos), 0.5 (neg), 0.1 (pos)
        let (s, _) = line_profiles(&[0.9, 0.5, 0.5, 0.1]);
        let labels = Labels::from_joined(&["a", "b", "a", "b", "a"]);
        let opts = MapOptions {
            method: MapMethod::Copairs,
            ..Default::default()
        };
        let r = mean_average_precision(&s, &labels, &opts, None).unwrap();
        // ranks of positives: 2 (tie won), 4 → (1/2 + 2/4) / 2
        let ap0 = (1.0 / 2.0 + 2.0 / 4.0) / 2.0;
        assert!((r.per_query[0] - ap0).abs() < 1e-15, "{}", r.per_query[0]);
        assert_eq!(r.n_positives, vec![2, 1, 2, 1, 2]);
        assert_eq!(r.n_queries, 5);
        assert_eq!(r.library_size, 4);
    }

    #[test]
    fn interpolated_ap_closed_form() {
        // query 0: positives at ranks 1 and 3 of 4 (no ties): precision 1 at recall 1/2, 2/3 at
        // recall 1. Axis of 5 points 0, .25, .5, .75, 1 → 1, 1, 1, 2/3, 2/3.
        let (s, _) = line_profiles(&[0.9, 0.7, 0.5, 0.1]);
        let labels = Labels::from_joined(&["a", "a", "", "a", ""]);
        let opts = MapOptions {
            recall_points: 5,
            ..Default::default()
        };
        let r = mean_average_precision(&s, &labels, &opts, None).unwrap();
        let e = (3.0 + 4.0 / 3.0) / 5.0;
        assert!(
            (r.per_query[0] - e).abs() < 1e-15,
            "{} vs {e}",
            r.per_query[0]
        );
        assert!(r.per_query[2].is_nan() && r.per_query[4].is_nan());
        let c = r.curve.unwrap();
        assert_eq!(c.recall, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        // Unlabelled items dropped: same ranking without the two negatives → AP 1 for query 0.
        let opts = MapOptions {
            recall_points: 5,
            unlabeled: Unlabeled::Drop,
            ..Default::default()
        };
        let r = mean_average_precision(&s, &labels, &opts, None).unwrap();
        assert_eq!(r.per_query[0], 1.0);
        assert_eq!(r.library_size, 2);
    }

    #[test]
    fn copairs_p_values_of_a_perfect_ranking() {
        // Two tight clusters; every query has its cluster mates first: AP 1, and the chance of a
        // random ranking doing as well is 1 / C(library, n_pos).
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for i in 0..12 {
            let c = i % 2;
            x.extend([1.0 - c as f64, c as f64, 0.01 * i as f64]);
            labels.push(if c == 0 { "a" } else { "b" });
        }
        let s = CosineSimilarity::new(&x, 12, 3).unwrap();
        let labels = Labels::from_joined(&labels);
        let opts = MapOptions {
            method: MapMethod::Copairs,
            null_size: 2000,
            seed: 3,
            ..Default::default()
        };
        let r = mean_average_precision(&s, &labels, &opts, None).unwrap();
        assert_eq!(r.mean, 1.0);
        let p = r.p_values.unwrap();
        // C(11, 5) = 462: expected #null ≥ 1 is 2000/462 ≈ 4.3.
        let e = (2000.0 / 462.0 + 1.0) / 2001.0;
        assert!(
            p.iter()
                .all(|&v| (v - e).abs() < 5.0 * (e / 2001.0).sqrt() + 1e-3),
            "{p:?}"
        );
        let q = r.q_values.unwrap();
        assert!(q.iter().zip(&p).all(|(q, p)| q >= p));
    }

    #[test]
    fn at_k_counts_hits_with_index_tiebreak() {
        let (s, _) = line_profiles(&[0.5, 0.5, 0.9, 0.1]);
        let labels = Labels::from_joined(&["a", "b", "a", "c", "a"]);
        let r =
            precision_recall_at_k(&s, &labels, &[1, 2, 3], &AtKOptions::default(), None).unwrap();
        // query 0 order: item 3 (0.9, c), item 1 (0.5, b), item 2 (0.5, a), item 4 (a)
        assert_eq!(&r.precision[0..3], &[0.0, 0.0, 1.0 / 3.0]);
        assert_eq!(&r.recall[0..3], &[0.0, 0.0, 0.5]);
        assert!(r.precision[3].is_nan()); // item 1 (b) is no query
        assert_eq!(r.n_queries, 3);
        assert!(precision_recall_at_k(&s, &labels, &[5], &AtKOptions::default(), None).is_err());
    }

    #[test]
    fn replicate_reproducibility_matches_brute_force() {
        let sims = [0.95, 0.2, 0.1, 0.3, -0.2, 0.6, 0.61];
        let (s, n) = line_profiles(&sims);
        let groups = ["x", "x", "", "y", "", "y", "z", "z"];
        assert_eq!(groups.len(), n);
        let r = replicate_reproducibility(&s, &groups, &ReplicateOptions::default(), None).unwrap();
        let u = s.unit_rows();
        let dot = |i: usize, j: usize| u[2 * i] * u[2 * j] + u[2 * i + 1] * u[2 * j + 1];
        let (mut rep, mut non) = (Vec::new(), Vec::new());
        for i in 0..n {
            for j in i + 1..n {
                if !groups[i].is_empty() && groups[i] == groups[j] {
                    rep.push(dot(i, j));
                } else {
                    non.push(dot(i, j));
                }
            }
        }
        let t = crate::metrics::similarity::percentile_linear(&mut non.clone(), 95.0);
        assert!((r.threshold - t).abs() < 1e-15, "{} vs {t}", r.threshold);
        let frac = rep.iter().filter(|&&v| v > t).count() as f64 / rep.len() as f64;
        assert_eq!(r.fraction, frac);
        assert_eq!((r.n_replicate_pairs, r.n_non_replicate_pairs), (3, 25));
        let singletons = ["a", "b", "c", "d", "e", "f", "g", "h"];
        assert!(
            replicate_reproducibility(&s, &singletons, &ReplicateOptions::default(), None).is_err()
        );
    }
}
