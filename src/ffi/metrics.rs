//! Retrieval metrics over the C ABI (`metrics::retrieval`, `metrics::enrichment`): mean average
//! precision, folds of enrichment, precision@k / recall@k, replicate reproducibility.

use super::boundary::{c_str_array, checked_len, guard, null, slice, slice_mut, write_out};
use super::options::{PhenoProgressFn, Prefix};
use crate::error::{Error, PhenoStatus, Result};
use crate::metrics::enrichment::{
    folds_of_enrichment, folds_of_enrichment_pooled, EnrichmentOptions, InfiniteOdds,
};
use crate::metrics::pvalues::Table2x2;
use crate::metrics::retrieval::{
    mean_average_precision, precision_recall_at_k, replicate_reproducibility, AtKOptions,
    MapMethod, MapOptions, ReplicateOptions, Unlabeled,
};
use crate::metrics::similarity::CosineSimilarity;
use crate::metrics::Labels;
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// How average precision is computed (see `pheno_mean_average_precision`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoMapMethod {
    /// The CP-CNN paper: interpolated precision max_{r' >= r} p(r') (tied similarities are one
    /// threshold), averaged over `recall_points` evenly spaced recall values in [0, 1].
    PHENO_MAP_INTERPOLATED = 0,
    /// DeepProfilerExperiments' `interpolated_precision_recall_curve`, exactly (recall axis
    /// linspace(0, 1, N), scikit-learn PR curve semantics, queries with >= 2 positives by default).
    PHENO_MAP_DEEPPROFILER = 1,
    /// copairs: mean over positives of precision at their rank, ties in favour of positives;
    /// permutation p-values when `null_size` > 0.
    PHENO_MAP_COPAIRS = 2,
}

/// What happens to items whose label string is empty.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoUnlabeled {
    /// They stay in every library as negatives (never queries). Default.
    PHENO_UNLABELED_NEGATIVES = 0,
    /// They are left out entirely (DeepProfilerExperiments evaluates annotated items only).
    PHENO_UNLABELED_DROP = 1,
}

/// How an infinite (v12 * v21 = 0) or undefined (an empty row or column) odds ratio is reported;
/// finite odds ratios are always scipy's (v11 * v22) / (v12 * v21).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoInfiniteOdds {
    /// Haldane-Anscombe: 0.5 added to every cell of such a table (finite). Default.
    PHENO_ODDS_HALDANE = 0,
    /// DeepProfilerExperiments: an infinite odds ratio becomes v22 (NaN stays NaN).
    PHENO_ODDS_DEEPPROFILER = 1,
    /// scipy's values unchanged (inf, NaN).
    PHENO_ODDS_KEEP = 2,
}

/// Options of the retrieval metrics (each function reads the fields it documents). Initialise
/// with `pheno_retrieval_default_options()`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoRetrievalOptions {
    /// `sizeof(PhenoRetrievalOptions)`; set by `pheno_retrieval_default_options()`.
    pub struct_size: usize,
    /// mAP convention (default PHENO_MAP_INTERPOLATED).
    pub method: PhenoMapMethod,
    /// Interpolated mAP: points of the recall axis; 0 (default) = the number of items taking part.
    pub recall_points: usize,
    /// DeepProfiler mAP: non-zero = scikit-learn before 1.1, whose precision_recall_curve stopped at
    /// the first full-recall threshold (default 0).
    pub sklearn_before_1_1: i32,
    /// Minimum positives for an item to be a query; 0 (default) = 2 for DeepProfiler mAP, else 1.
    pub min_positives: usize,
    /// Items without labels (default PHENO_UNLABELED_NEGATIVES).
    pub unlabeled: PhenoUnlabeled,
    /// copairs mAP: random rankings per (positives, library size) for p-values; 0 (default) = none.
    pub null_size: usize,
    /// Seed of the permutation nulls (default 0).
    pub seed: u64,
    /// Folds of enrichment: percentile of the similarities separating "above" (default 99).
    pub enrichment_percentile: f64,
    /// Folds of enrichment: infinite odds ratios (default PHENO_ODDS_HALDANE).
    pub infinite_odds: PhenoInfiniteOdds,
    /// Replicate reproducibility: percentile of the non-replicate similarities (default 95).
    pub replicate_percentile: f64,
    /// Query rows per similarity block; 0 (default) = automatic (about 32 MiB per block).
    pub block_rows: usize,
    /// Called between blocks with (rows done, total) on the calling thread; may be NULL.
    pub progress: PhenoProgressFn,
    /// Passed unchanged to `progress`.
    pub user_data: *mut c_void,
    /// copairs mAP: non-zero (default 1) = rank by similarities rounded to float32, as copairs 0.5.5
    /// stores them (values equal in float32 tie, ties favour positives); 0 = by the float64 values.
    pub copairs_float32: i32,
}

/// Default retrieval options: interpolated mAP on a recall axis of N points, queries with >= 1
/// positive (2 for DeepProfiler), unlabelled items as negatives, no p-values, copairs ranking in
/// float32, seed 0, enrichment at
/// the 99th percentile with Haldane-Anscombe odds for empty cells, replicate reproducibility at the
/// 95th percentile, automatic blocks, no progress callback.
#[no_mangle]
pub extern "C" fn pheno_retrieval_default_options() -> PhenoRetrievalOptions {
    PhenoRetrievalOptions {
        struct_size: size_of::<PhenoRetrievalOptions>(),
        method: PhenoMapMethod::PHENO_MAP_INTERPOLATED,
        recall_points: 0,
        sklearn_before_1_1: 0,
        min_positives: 0,
        unlabeled: PhenoUnlabeled::PHENO_UNLABELED_NEGATIVES,
        null_size: 0,
        seed: 0,
        enrichment_percentile: 99.0,
        infinite_odds: PhenoInfiniteOdds::PHENO_ODDS_HALDANE,
        replicate_percentile: 95.0,
        block_rows: 0,
        progress: None,
        user_data: std::ptr::null_mut(),
        copairs_float32: 1,
    }
}

struct Opts {
    map: MapOptions,
    enrichment: EnrichmentOptions,
    replicate: ReplicateOptions,
    at_k: AtKOptions,
    progress: PhenoProgressFn,
    user_data: *mut c_void,
}

/// # Safety
/// `p` is NULL or points to a `PhenoRetrievalOptions` of at least `p->struct_size` bytes.
unsafe fn retrieval_opts(p: *const PhenoRetrievalOptions) -> Result<Opts> {
    let mut map = MapOptions::default();
    let mut enrichment = EnrichmentOptions::default();
    let mut replicate = ReplicateOptions::default();
    let (mut progress, mut user_data): (PhenoProgressFn, *mut c_void) =
        (None, std::ptr::null_mut());
    if let Some(pre) = Prefix::new(p, "opts", "pheno_retrieval_default_options")? {
        macro_rules! read {
            ($field:ident, $ty:ty, |$v:ident| $set:expr) => {
                if let Some($v) = pre.field::<$ty>(offset_of!(PhenoRetrievalOptions, $field)) {
                    $set;
                }
            };
        }
        read!(method, i32, |v| {
            map.method = match v {
                0 => MapMethod::Interpolated,
                1 => MapMethod::DeepProfiler,
                2 => MapMethod::Copairs,
                _ => return Err(Error::InvalidArgument(format!(
                    "opts->method is {v}; expected PHENO_MAP_INTERPOLATED (0), PHENO_MAP_DEEPPROFILER (1) or PHENO_MAP_COPAIRS (2)"
                ))),
            }
        });
        read!(recall_points, usize, |v| map.recall_points = v);
        read!(sklearn_before_1_1, i32, |v| map.sklearn_before_1_1 = v != 0);
        read!(min_positives, usize, |v| map.min_positives = v);
        read!(unlabeled, i32, |v| {
            map.unlabeled = match v {
                0 => Unlabeled::Negatives,
                1 => Unlabeled::Drop,
                _ => return Err(Error::InvalidArgument(format!(
                    "opts->unlabeled is {v}; expected PHENO_UNLABELED_NEGATIVES (0) or PHENO_UNLABELED_DROP (1)"
                ))),
            }
        });
        read!(null_size, usize, |v| map.null_size = v);
        read!(copairs_float32, i32, |v| map.copairs_float32 = v != 0);
        read!(seed, u64, |v| map.seed = v);
        read!(enrichment_percentile, f64, |v| enrichment.percentile = v);
        read!(infinite_odds, i32, |v| {
            enrichment.infinite_odds = match v {
                0 => InfiniteOdds::Haldane,
                1 => InfiniteOdds::DeepProfiler,
                2 => InfiniteOdds::Keep,
                _ => return Err(Error::InvalidArgument(format!(
                    "opts->infinite_odds is {v}; expected PHENO_ODDS_HALDANE (0), PHENO_ODDS_DEEPPROFILER (1) or PHENO_ODDS_KEEP (2)"
                ))),
            }
        });
        read!(replicate_percentile, f64, |v| replicate.percentile = v);
        read!(block_rows, usize, |v| map.block_rows = v);
        read!(progress, PhenoProgressFn, |v| progress = v);
        read!(user_data, *mut c_void, |v| user_data = v);
    }
    enrichment.min_positives = map.min_positives;
    enrichment.unlabeled = map.unlabeled;
    enrichment.block_rows = map.block_rows;
    replicate.block_rows = map.block_rows;
    let at_k = AtKOptions {
        min_positives: map.min_positives,
        unlabeled: map.unlabeled,
        block_rows: map.block_rows,
    };
    Ok(Opts {
        map,
        enrichment,
        replicate,
        at_k,
        progress,
        user_data,
    })
}

impl Opts {
    fn report(&self) -> impl FnMut(usize, usize) -> bool {
        let (progress, user_data) = (self.progress, self.user_data);
        move |done, total| match progress {
            // SAFETY: the caller promised a valid callback taking its own user_data.
            Some(f) => unsafe { f(done, total, user_data) == 0 },
            None => true,
        }
    }
}

/// # Safety
/// `x` points to n * d doubles.
unsafe fn profiles(x: *const f64, n: usize, d: usize) -> Result<CosineSimilarity> {
    let len = checked_len::<f64>(&[n, d], "x")?;
    CosineSimilarity::new(slice(x, len, "x")?, n, d)
}

/// # Safety
/// `labels` points to `n_labels` NUL-terminated strings.
unsafe fn label_strings<'a>(
    labels: *const *const c_char,
    n_labels: usize,
    n: usize,
    what: &str,
) -> Result<Vec<&'a str>> {
    if n_labels != n {
        return Err(Error::Shape(format!(
            "n_{what} is {n_labels} but there are n = {n} profiles"
        )));
    }
    c_str_array(labels, n_labels, what)
}

/// Optional per-item output: NULL is skipped; otherwise its capacity must hold `values`.
///
/// # Safety
/// A non-NULL `p` points to `cap` writable elements.
unsafe fn put<T: Copy>(p: *mut T, cap: usize, values: &[T], what: &str) -> Result<()> {
    if p.is_null() {
        return Ok(());
    }
    if cap < values.len() {
        return Err(Error::Shape(format!(
            "{what}_len is {cap} but {} values are needed",
            values.len()
        )));
    }
    slice_mut(p, values.len(), what)?.copy_from_slice(values);
    Ok(())
}

/// Checks an optional output's capacity before any work is done.
fn need(p_is_null: bool, cap: usize, needed: usize, what: &str) -> Result<()> {
    if !p_is_null && cap < needed {
        return Err(Error::Shape(format!(
            "{what}_len is {cap} but {needed} values are needed"
        )));
    }
    Ok(())
}

/// Mean average precision of cosine-similarity retrieval over the `n` x `d` row-major profiles
/// `x` (double), with one `|`-joined label string per profile in `labels` ("" = none;
/// `n_labels` must equal n). A query is an item sharing a label with at least
/// `opts->min_positives` others; its library is every other item; a hit shares a label.
///
/// Outputs (each may be NULL; `*_len` is its capacity, checked before any work):
/// - `ap` (n): AP of each query, NaN for non-queries;
/// - `p_values`, `q_values` (n): copairs method with `null_size` > 0: permutation p-values
///   (#null APs >= AP + 1) / (null_size + 1) and Benjamini-Hochberg q-values over the queries;
///   NaN for non-queries and when no p-values were computed;
/// - `n_positives` (n): positives of every item in its library;
/// - `curve`: interpolated and DeepProfiler methods: the mean over queries of their interpolated
///   precision at recall i / (R - 1), i = 0..R-1 (R = `recall_points`, or the number of items taking
///   part); `curve_len` must be >= R. `curve_points` (may be NULL) receives R (0 for copairs).
///
/// `mean` (required) receives the mean AP over queries (NaN when there are none).
///
/// Memory is O(block x n), never n x n. Returns PHENO_ERR_NON_FINITE for NaN/Inf in `x` (naming
/// row and column), PHENO_ERR_SHAPE for mismatched lengths or short buffers,
/// PHENO_ERR_INVALID_ARGUMENT for bad options, PHENO_ERR_CANCELLED when `progress` asks to stop.
/// Thread-safe; `progress` runs on the calling thread.
///
/// # Safety
/// `x` points to n * d doubles, `labels` to n_labels NUL-terminated strings, `opts` is NULL or
/// initialised by `pheno_retrieval_default_options()`, every non-NULL output points to its
/// capacity in elements, `curve_points` is NULL or writable, `mean` is writable.
#[no_mangle]
pub unsafe extern "C" fn pheno_mean_average_precision(
    x: *const f64,
    n: usize,
    d: usize,
    labels: *const *const c_char,
    n_labels: usize,
    opts: *const PhenoRetrievalOptions,
    ap: *mut f64,
    ap_len: usize,
    p_values: *mut f64,
    p_values_len: usize,
    q_values: *mut f64,
    q_values_len: usize,
    n_positives: *mut usize,
    n_positives_len: usize,
    curve: *mut f64,
    curve_len: usize,
    curve_points: *mut usize,
    mean: *mut f64,
) -> PhenoStatus {
    guard("pheno_mean_average_precision", || {
        if mean.is_null() {
            return Err(null("mean"));
        }
        let o = retrieval_opts(opts)?;
        let sim = profiles(x, n, d)?;
        let labels = Labels::from_joined(&label_strings(labels, n_labels, n, "labels")?);
        need(ap.is_null(), ap_len, n, "ap")?;
        need(p_values.is_null(), p_values_len, n, "p_values")?;
        need(q_values.is_null(), q_values_len, n, "q_values")?;
        need(n_positives.is_null(), n_positives_len, n, "n_positives")?;
        let mut report = o.report();
        let r = mean_average_precision(&sim, &labels, &o.map, Some(&mut report))?;
        let points = r.curve.as_ref().map_or(0, |c| c.precision.len());
        if let Some(c) = &r.curve {
            put(curve, curve_len, &c.precision, "curve")?;
        }
        put(ap, ap_len, &r.per_query, "ap")?;
        let nan = vec![f64::NAN; n];
        put(
            p_values,
            p_values_len,
            r.p_values.as_deref().unwrap_or(&nan),
            "p_values",
        )?;
        put(
            q_values,
            q_values_len,
            r.q_values.as_deref().unwrap_or(&nan),
            "q_values",
        )?;
        put(n_positives, n_positives_len, &r.n_positives, "n_positives")?;
        if !curve_points.is_null() {
            write_out(curve_points, points, "curve_points")?;
        }
        write_out(mean, r.mean, "mean")
    })
}

/// Folds of enrichment (CP-CNN paper) over the `n` x `d` profiles `x` (double) with `|`-joined
/// `labels` (as `pheno_mean_average_precision`). Per query: threshold = the
/// `opts->enrichment_percentile` percentile (numpy linear) of its similarities to its library;
/// table [[v11, v12], [v21, v22]] = above / at-or-below x same / different annotation; one-sided
/// (greater) Fisher exact p-value; odds ratio (v11 v22) / (v12 v21) with `opts->infinite_odds`.
///
/// Outputs (each may be NULL, capacity-checked; NaN / zeros for non-queries): `odds_ratio`,
/// `p_values`, `thresholds` (n each); `tables` (4 n uint64: v11, v12, v21, v22 per item).
/// `mean_odds_ratio` (required): the mean over queries. Errors and thread-safety as
/// `pheno_mean_average_precision`.
///
/// # Safety
/// As `pheno_mean_average_precision`; `mean_odds_ratio` is writable.
#[no_mangle]
pub unsafe extern "C" fn pheno_folds_of_enrichment(
    x: *const f64,
    n: usize,
    d: usize,
    labels: *const *const c_char,
    n_labels: usize,
    opts: *const PhenoRetrievalOptions,
    odds_ratio: *mut f64,
    odds_ratio_len: usize,
    p_values: *mut f64,
    p_values_len: usize,
    thresholds: *mut f64,
    thresholds_len: usize,
    tables: *mut u64,
    tables_len: usize,
    mean_odds_ratio: *mut f64,
) -> PhenoStatus {
    guard("pheno_folds_of_enrichment", || {
        if mean_odds_ratio.is_null() {
            return Err(null("mean_odds_ratio"));
        }
        let o = retrieval_opts(opts)?;
        let sim = profiles(x, n, d)?;
        let labels = Labels::from_joined(&label_strings(labels, n_labels, n, "labels")?);
        need(odds_ratio.is_null(), odds_ratio_len, n, "odds_ratio")?;
        need(p_values.is_null(), p_values_len, n, "p_values")?;
        need(thresholds.is_null(), thresholds_len, n, "thresholds")?;
        need(
            tables.is_null(),
            tables_len,
            checked_len::<u64>(&[n, 4], "tables")?,
            "tables",
        )?;
        let mut report = o.report();
        let r = folds_of_enrichment(&sim, &labels, &o.enrichment, Some(&mut report))?;
        put(odds_ratio, odds_ratio_len, &r.odds_ratio, "odds_ratio")?;
        put(p_values, p_values_len, &r.p_value, "p_values")?;
        put(thresholds, thresholds_len, &r.threshold, "thresholds")?;
        let flat: Vec<u64> = r
            .table
            .iter()
            .flat_map(|t| [t[0][0], t[0][1], t[1][0], t[1][1]])
            .collect();
        put(tables, tables_len, &flat, "tables")?;
        write_out(mean_odds_ratio, r.mean_odds_ratio, "mean_odds_ratio")
    })
}

/// Folds of enrichment with one threshold over all (query, library item) pairs (cytominer-eval's
/// `enrichment`): the `opts->enrichment_percentile` percentile of all those similarities, one
/// pooled table `table` (4 uint64: v11, v12, v21, v22; required), its odds ratio
/// (`opts->infinite_odds`) and one-sided Fisher p-value. Exact in memory O(block x n) (extra passes
/// over the similarities when there are more than 2^23 pairs). `threshold`, `odds_ratio` and
/// `p_value` are required. Errors and thread-safety as `pheno_mean_average_precision`.
///
/// # Safety
/// As `pheno_mean_average_precision`; `table` points to 4 writable uint64, the others are
/// writable.
#[no_mangle]
pub unsafe extern "C" fn pheno_folds_of_enrichment_pooled(
    x: *const f64,
    n: usize,
    d: usize,
    labels: *const *const c_char,
    n_labels: usize,
    opts: *const PhenoRetrievalOptions,
    threshold: *mut f64,
    table: *mut u64,
    odds_ratio: *mut f64,
    p_value: *mut f64,
) -> PhenoStatus {
    guard("pheno_folds_of_enrichment_pooled", || {
        for (p, what) in [
            (threshold, "threshold"),
            (odds_ratio, "odds_ratio"),
            (p_value, "p_value"),
        ] {
            if p.is_null() {
                return Err(null(what));
            }
        }
        let table = slice_mut(table, 4, "table")?;
        let o = retrieval_opts(opts)?;
        let sim = profiles(x, n, d)?;
        let labels = Labels::from_joined(&label_strings(labels, n_labels, n, "labels")?);
        let mut report = o.report();
        let r = folds_of_enrichment_pooled(&sim, &labels, &o.enrichment, Some(&mut report))?;
        let t: &Table2x2 = &r.table;
        table.copy_from_slice(&[t[0][0], t[0][1], t[1][0], t[1][1]]);
        write_out(threshold, r.threshold, "threshold")?;
        write_out(odds_ratio, r.odds_ratio, "odds_ratio")?;
        write_out(p_value, r.p_value, "p_value")
    })
}

/// precision@k and recall@k per query for each of the `n_ks` values in `ks` (each in 1..=library
/// size), over the profiles `x` (double) with `|`-joined `labels`: hits among the k most similar
/// library items / k, and / #positives; similarity ties ordered by item index. `precision` and
/// `recall` (n x n_ks, row-major, NaN rows for non-queries; may be NULL) and `mean_precision`,
/// `mean_recall` (n_ks, means over queries; may be NULL) are capacity-checked. Errors and
/// thread-safety as `pheno_mean_average_precision`.
///
/// # Safety
/// As `pheno_mean_average_precision`; `ks` points to n_ks size_t values.
#[no_mangle]
pub unsafe extern "C" fn pheno_precision_recall_at_k(
    x: *const f64,
    n: usize,
    d: usize,
    labels: *const *const c_char,
    n_labels: usize,
    ks: *const usize,
    n_ks: usize,
    opts: *const PhenoRetrievalOptions,
    precision: *mut f64,
    precision_len: usize,
    recall: *mut f64,
    recall_len: usize,
    mean_precision: *mut f64,
    mean_precision_len: usize,
    mean_recall: *mut f64,
    mean_recall_len: usize,
) -> PhenoStatus {
    guard("pheno_precision_recall_at_k", || {
        let ks = slice(ks, n_ks, "ks")?;
        let o = retrieval_opts(opts)?;
        let sim = profiles(x, n, d)?;
        let labels = Labels::from_joined(&label_strings(labels, n_labels, n, "labels")?);
        let cells = checked_len::<f64>(&[n, n_ks], "precision")?;
        need(precision.is_null(), precision_len, cells, "precision")?;
        need(recall.is_null(), recall_len, cells, "recall")?;
        need(
            mean_precision.is_null(),
            mean_precision_len,
            n_ks,
            "mean_precision",
        )?;
        need(mean_recall.is_null(), mean_recall_len, n_ks, "mean_recall")?;
        let mut report = o.report();
        let r = precision_recall_at_k(&sim, &labels, ks, &o.at_k, Some(&mut report))?;
        put(precision, precision_len, &r.precision, "precision")?;
        put(recall, recall_len, &r.recall, "recall")?;
        put(
            mean_precision,
            mean_precision_len,
            &r.mean_precision,
            "mean_precision",
        )?;
        put(mean_recall, mean_recall_len, &r.mean_recall, "mean_recall")
    })
}

/// Replicate reproducibility (cytominer-eval): over all pairs i < j of the `n` x `d` profiles `x`
/// (double), replicate pairs share a non-empty string of `groups` (`n_groups` must equal n; ""
/// = in no replicate pair); `threshold` = the `opts->replicate_percentile` percentile (numpy
/// linear) of the non-replicate pairs' cosine similarities; `fraction` = the fraction of replicate
/// pairs above it. `fraction` is required; `threshold` and `n_replicate_pairs` may be NULL. Exact
/// in memory O(block x n). PHENO_ERR_INVALID_ARGUMENT when there is no replicate or no
/// non-replicate pair; otherwise errors and thread-safety as `pheno_mean_average_precision`.
///
/// # Safety
/// `x` points to n * d doubles, `groups` to n_groups NUL-terminated strings, `opts` is NULL or
/// initialised, `fraction` is writable, `threshold` and `n_replicate_pairs` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pheno_replicate_reproducibility(
    x: *const f64,
    n: usize,
    d: usize,
    groups: *const *const c_char,
    n_groups: usize,
    opts: *const PhenoRetrievalOptions,
    fraction: *mut f64,
    threshold: *mut f64,
    n_replicate_pairs: *mut u64,
) -> PhenoStatus {
    guard("pheno_replicate_reproducibility", || {
        if fraction.is_null() {
            return Err(null("fraction"));
        }
        let o = retrieval_opts(opts)?;
        let sim = profiles(x, n, d)?;
        let groups = label_strings(groups, n_groups, n, "groups")?;
        let mut report = o.report();
        let r = replicate_reproducibility(&sim, &groups, &o.replicate, Some(&mut report))?;
        if !threshold.is_null() {
            write_out(threshold, r.threshold, "threshold")?;
        }
        if !n_replicate_pairs.is_null() {
            write_out(n_replicate_pairs, r.n_replicate_pairs, "n_replicate_pairs")?;
        }
        write_out(fraction, r.fraction, "fraction")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn c_labels(v: &[&str]) -> (Vec<CString>, Vec<*const c_char>) {
        let owned: Vec<CString> = v.iter().map(|s| CString::new(*s).unwrap()).collect();
        let ptrs = owned.iter().map(|s| s.as_ptr()).collect();
        (owned, ptrs)
    }

    #[test]
    fn map_through_the_abi_matches_rust() {
        let x = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9, 0.7, 0.7];
        let (_o, l) = c_labels(&["a", "a", "b", "b", ""]);
        let mut o = pheno_retrieval_default_options();
        o.method = PhenoMapMethod::PHENO_MAP_COPAIRS;
        o.null_size = 100;
        let (mut ap, mut p, mut np, mut mean) = ([0.0; 5], [0.0; 5], [0usize; 5], 0.0);
        let st = unsafe {
            pheno_mean_average_precision(
                x.as_ptr(),
                5,
                2,
                l.as_ptr(),
                5,
                &o,
                ap.as_mut_ptr(),
                5,
                p.as_mut_ptr(),
                5,
                std::ptr::null_mut(),
                0,
                np.as_mut_ptr(),
                5,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                &mut mean,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        assert_eq!(&ap[..4], &[1.0; 4]);
        assert!(ap[4].is_nan() && p[4].is_nan());
        assert_eq!(np, [1, 1, 1, 1, 0]);
        assert_eq!(mean, 1.0);
        // A short buffer is a shape error before any work; a bad enum an argument error.
        let st = unsafe {
            pheno_mean_average_precision(
                x.as_ptr(),
                5,
                2,
                l.as_ptr(),
                5,
                &o,
                ap.as_mut_ptr(),
                4,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                &mut mean,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);
        unsafe { (std::ptr::addr_of_mut!(o.method) as *mut i32).write(9) };
        let st = unsafe {
            pheno_mean_average_precision(
                x.as_ptr(),
                5,
                2,
                l.as_ptr(),
                5,
                &o,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                &mut mean,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn older_smaller_options_struct_gets_defaults() {
        let mut o = pheno_retrieval_default_options();
        o.method = PhenoMapMethod::PHENO_MAP_DEEPPROFILER;
        o.enrichment_percentile = 90.0;
        o.struct_size = offset_of!(PhenoRetrievalOptions, recall_points);
        let r = unsafe { retrieval_opts(&o) }.unwrap();
        assert_eq!(r.map.method, MapMethod::DeepProfiler);
        assert_eq!(r.enrichment.percentile, 99.0);
    }
}
