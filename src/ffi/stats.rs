//! Classification metrics (sklearn AP and ROC-AUC), statistics (ANOVA, Tukey HSD), reference
//! subprofiles, Biosimilarity and the MoA / target prediction protocol over the C ABI. All of these
//! functions are thread-safe (no shared state beyond the thread pool).

use super::boundary::{c_str_array, checked_len, guard, null, slice, slice_mut, write_out};
use super::options::Prefix;
use crate::error::{Error, PhenoStatus, Result};
use crate::metrics::classification::{self as cls, Average};
use crate::metrics::stats::{anova_oneway, tukey_hsd};
use crate::metrics::subprofile::{
    self as sub, BiosimilarityForm, FoldMetrics, PredictionOptions, SubsetMetrics,
};
use crate::metrics::Labels;
use std::ffi::c_char;
use std::mem::{offset_of, size_of};

/// How a multi-label metric is averaged (scikit-learn's `average`). Passed as an `int32_t`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoAverage {
    /// Unweighted mean over labels (sklearn's default).
    PHENO_AVERAGE_MACRO = 0,
    /// One binary problem over all n × n_labels entries.
    PHENO_AVERAGE_MICRO = 1,
    /// Mean over labels weighted by their number of positives.
    PHENO_AVERAGE_WEIGHTED = 2,
    /// Mean over samples (rows); the LDM paper's mAP for average precision.
    PHENO_AVERAGE_SAMPLES = 3,
    /// No average: one value per label.
    PHENO_AVERAGE_NONE = 4,
}

/// Form of the Biosimilarity. Passed as an `int32_t`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoBiosimilarity {
    /// Pearson correlation over the subprofile's features (LDM paper eq. 3); NaN when undefined
    /// (fewer than 2 features, or a constant vector).
    PHENO_BIOSIM_PEARSON = 0,
    /// Pahl et al.'s code: both clipped to ±25, Pearson, negative or NaN → 0, percent rounded to 0.1.
    PHENO_BIOSIM_PAHL = 1,
}

/// Query metrics of one fold for one subset of its queries (NaN metrics when the subset is empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhenoSubsetMetrics {
    pub n_queries: usize,
    /// Labels with both positive and negative queries, over which the macro averages run.
    pub n_labels_scored: usize,
    /// Mean over queries of the sklearn AP of each query's label ranking (LDM paper eq. 4–5).
    pub map: f64,
    /// Mean over scored labels of the AP of each label's query ranking.
    pub ap_macro: f64,
    /// Mean over scored labels of the ROC-AUC (LDM paper eq. 7).
    pub roc_auc_macro: f64,
    /// Fraction of queries whose most similar reference subprofile is one of their labels.
    pub top1_accuracy: f64,
}

/// Metrics of one fold of `pheno_moa_prediction`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhenoFoldMetrics {
    /// Distinct reference compounds of the fold.
    pub n_references: usize,
    pub all: PhenoSubsetMetrics,
    /// Queries flagged seen (all queries when `seen` is NULL).
    pub seen: PhenoSubsetMetrics,
    pub unseen: PhenoSubsetMetrics,
}

/// Options of `pheno_moa_prediction`. Initialise with `pheno_prediction_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoPredictionOptions {
    /// `sizeof(PhenoPredictionOptions)`; set by `pheno_prediction_default_options()`.
    pub struct_size: usize,
    /// Labels need at least this many eligible compounds (default 10).
    pub min_compounds: usize,
    /// Reference compounds drawn per label and fold (default 5).
    pub n_reference: usize,
    /// Folds drawn when no references are given (default 10).
    pub n_folds: usize,
    /// Seed of the reference draws (default 0).
    pub seed: u64,
    /// Subprofile consistency threshold, 0 < t <= 1 (default 0.85).
    pub threshold: f64,
    /// Default PHENO_BIOSIM_PEARSON.
    pub form: PhenoBiosimilarity,
    /// Non-zero (default): only compounds with exactly one label take part (MoAs); 0 for targets.
    pub single_label: i32,
}

/// Default prediction options, the LDM paper's MoA protocol: labels with >= 10 compounds, 5
/// references per label, 10 folds, seed 0, threshold 0.85, Pearson Biosimilarity, single-label
/// compounds only.
#[no_mangle]
pub extern "C" fn pheno_prediction_default_options() -> PhenoPredictionOptions {
    let d = PredictionOptions::default();
    PhenoPredictionOptions {
        struct_size: size_of::<PhenoPredictionOptions>(),
        min_compounds: d.min_compounds,
        n_reference: d.n_reference,
        n_folds: d.n_folds,
        seed: d.seed,
        threshold: d.threshold,
        form: PhenoBiosimilarity::PHENO_BIOSIM_PEARSON,
        single_label: 1,
    }
}

fn form_from(v: i32, what: &str) -> Result<BiosimilarityForm> {
    match v {
        0 => Ok(BiosimilarityForm::Pearson),
        1 => Ok(BiosimilarityForm::Pahl),
        _ => Err(Error::InvalidArgument(format!(
            "{what} is {v}; expected PHENO_BIOSIM_PEARSON (0) or PHENO_BIOSIM_PAHL (1)"
        ))),
    }
}

/// # Safety
/// `p` is NULL or points to a `PhenoPredictionOptions` of at least `p->struct_size` bytes.
unsafe fn prediction_opts(p: *const PhenoPredictionOptions) -> Result<PredictionOptions> {
    let mut o = PredictionOptions::default();
    let Some(pre) = Prefix::new(p, "opts", "pheno_prediction_default_options")? else {
        return Ok(o);
    };
    macro_rules! read {
        ($field:ident, $ty:ty, |$v:ident| $set:expr) => {
            if let Some($v) = pre.field::<$ty>(offset_of!(PhenoPredictionOptions, $field)) {
                $set;
            }
        };
    }
    read!(min_compounds, usize, |v| o.min_compounds = v);
    read!(n_reference, usize, |v| o.n_reference = v);
    read!(n_folds, usize, |v| o.n_folds = v);
    read!(seed, u64, |v| o.seed = v);
    read!(threshold, f64, |v| o.threshold = v);
    read!(form, i32, |v| o.form = form_from(v, "opts->form")?);
    read!(single_label, i32, |v| o.single_label = v != 0);
    Ok(o)
}

/// The n × n_labels score matrix and indicator matrix of a classification call.
///
/// # Safety
/// `scores` and `truth` point to n × n_labels values.
unsafe fn score_inputs<'a>(
    scores: *const f64,
    truth: *const u8,
    n: usize,
    n_labels: usize,
) -> Result<(&'a [f64], Vec<bool>)> {
    let len = checked_len::<f64>(&[n, n_labels], "scores")?;
    if len == 0 {
        return Err(Error::InvalidArgument(format!(
            "no scores (n = {n}, n_labels = {n_labels})"
        )));
    }
    let s = slice(scores, len, "scores")?;
    let t = slice(truth, len, "truth")?
        .iter()
        .map(|&b| b != 0)
        .collect();
    Ok((s, t))
}

/// The binary metric a classification call computes.
#[derive(Clone, Copy)]
enum Which {
    AveragePrecision,
    RocAuc,
}

/// # Safety
/// `scores` and `truth` point to n × n_labels values; `out` to `out_len` writable doubles.
unsafe fn classification(
    which: Which,
    scores: *const f64,
    truth: *const u8,
    (n, n_labels): (usize, usize),
    average: i32,
    out: *mut f64,
    out_len: usize,
) -> Result<()> {
    let (s, t) = score_inputs(scores, truth, n, n_labels)?;
    let averaged = |a: Average| match which {
        Which::AveragePrecision => cls::average_precision_multilabel(s, &t, n_labels, a),
        Which::RocAuc => cls::roc_auc_multilabel(s, &t, n_labels, a),
    };
    let values = match average {
        0 => vec![averaged(Average::Macro)?],
        1 => vec![averaged(Average::Micro)?],
        2 => vec![averaged(Average::Weighted)?],
        3 => vec![averaged(Average::Samples)?],
        4 => match which {
            Which::AveragePrecision => cls::average_precision_per_label(s, &t, n_labels)?,
            Which::RocAuc => cls::roc_auc_per_label(s, &t, n_labels)?,
        },
        _ => {
            return Err(Error::InvalidArgument(format!(
            "average is {average}; expected PHENO_AVERAGE_MACRO (0), _MICRO (1), _WEIGHTED (2), \
                 _SAMPLES (3) or _NONE (4)"
        )))
        }
    };
    if out_len < values.len() {
        return Err(Error::Shape(format!(
            "out_len is {out_len}; {} values are written",
            values.len()
        )));
    }
    slice_mut(out, values.len(), "out")?.copy_from_slice(&values);
    Ok(())
}

/// Average precision with scikit-learn 1.9 semantics (`average_precision_score(truth, scores)`):
/// Σ (R_n − R_{n−1}) P_n over the distinct scores, tied scores forming one threshold; 0 for a label
/// without positives. `scores` (double) and `truth` (0 = negative, anything else = positive) are
/// n × n_labels row-major; n_labels = 1 is the binary problem (`average` then ignored, as sklearn
/// does). `average` is a `PhenoAverage`: one value is written to `out`, or n_labels values for
/// PHENO_AVERAGE_NONE; `out_len` is the capacity of `out`. Scores must be finite.
/// # Safety
/// `scores` and `truth` point to n × n_labels values; `out` to `out_len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_average_precision_score(
    scores: *const f64,
    truth: *const u8,
    n: usize,
    n_labels: usize,
    average: i32,
    out: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_average_precision_score", || {
        classification(
            Which::AveragePrecision,
            scores,
            truth,
            (n, n_labels),
            average,
            out,
            out_len,
        )
    })
}

/// ROC-AUC with scikit-learn 1.9 semantics (`roc_auc_score(truth, scores)`): trapezoidal area
/// under the ROC curve, tied scores as one threshold. A label with only one class has NaN (sklearn
/// 1.9 warns and returns NaN); a macro or samples average containing it is NaN. Arguments as
/// `pheno_average_precision_score`.
/// # Safety
/// `scores` and `truth` point to n × n_labels values; `out` to `out_len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_roc_auc_score(
    scores: *const f64,
    truth: *const u8,
    n: usize,
    n_labels: usize,
    average: i32,
    out: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_roc_auc_score", || {
        classification(
            Which::RocAuc,
            scores,
            truth,
            (n, n_labels),
            average,
            out,
            out_len,
        )
    })
}

/// The groups of a statistics call: `values` (double) holds the groups one after another,
/// `group_sizes[g]` values each.
///
/// # Safety
/// `group_sizes` points to n_groups sizes, `values` to their sum of doubles.
unsafe fn groups<'a>(
    values: *const f64,
    group_sizes: *const usize,
    n_groups: usize,
) -> Result<Vec<&'a [f64]>> {
    let sizes = slice(group_sizes, n_groups, "group_sizes")?;
    let total = sizes
        .iter()
        .try_fold(0usize, |a, &s| a.checked_add(s))
        .ok_or_else(|| Error::Shape("group_sizes: the total overflows".into()))?;
    let all = slice(values, checked_len::<f64>(&[total], "values")?, "values")?;
    let mut out = Vec::with_capacity(n_groups);
    let mut at = 0;
    for &s in sizes {
        out.push(&all[at..at + s]);
        at += s;
    }
    Ok(out)
}

/// One-way ANOVA (scipy `f_oneway`): F statistic and p-value of `n_groups` >= 2 groups, stored one
/// after another in `values` (double) with `group_sizes[g]` values each (>= 1 each, more values
/// than groups, all finite). When every group is constant F is +inf and p 0; when all values are
/// equal both are NaN (as scipy).
///
/// # Safety
/// `group_sizes` points to n_groups sizes, `values` to their sum of doubles; `out_f` and `out_p`
/// are valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_anova_oneway(
    values: *const f64,
    group_sizes: *const usize,
    n_groups: usize,
    out_f: *mut f64,
    out_p: *mut f64,
) -> PhenoStatus {
    guard("pheno_anova_oneway", || {
        if out_f.is_null() {
            return Err(null("out_f"));
        }
        if out_p.is_null() {
            return Err(null("out_p"));
        }
        let a = anova_oneway(&groups(values, group_sizes, n_groups)?)?;
        write_out(out_f, a.f, "out_f")?;
        write_out(out_p, a.p_value, "out_p")
    })
}

/// Tukey's HSD for all pairs of `n_groups` >= 2 groups (scipy `tukey_hsd`; Tukey–Kramer for
/// unequal sizes), groups laid out as in `pheno_anova_oneway` with >= 2 values each. Writes
/// k × k row-major matrices (k = n_groups, each `out_len` >= k²): `out_statistic[i,j]` =
/// mean_i − mean_j, `out_pvalue` the adjusted p-values from the studentized range distribution, and,
/// when `out_low` and `out_high` are not NULL, the simultaneous confidence interval at
/// `confidence_level` (0 < level < 1, e.g. 0.95).
///
/// # Safety
/// `values` and `group_sizes` as in `pheno_anova_oneway`; each non-NULL output points to `out_len`
/// writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_tukey_hsd(
    values: *const f64,
    group_sizes: *const usize,
    n_groups: usize,
    confidence_level: f64,
    out_statistic: *mut f64,
    out_pvalue: *mut f64,
    out_low: *mut f64,
    out_high: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_tukey_hsd", || {
        let kk = checked_len::<f64>(&[n_groups, n_groups], "out")?;
        if out_len < kk {
            return Err(Error::Shape(format!(
                "out_len is {out_len}; {n_groups} groups need {kk}"
            )));
        }
        let stat = slice_mut(out_statistic, kk, "out_statistic")?;
        let pval = slice_mut(out_pvalue, kk, "out_pvalue")?;
        if out_low.is_null() != out_high.is_null() {
            return Err(null(if out_low.is_null() {
                "out_low"
            } else {
                "out_high"
            }));
        }
        let t = tukey_hsd(&groups(values, group_sizes, n_groups)?)?;
        if !out_low.is_null() {
            let (low, high) = t.confidence_interval(confidence_level)?;
            slice_mut(out_low, kk, "out_low")?.copy_from_slice(&low);
            slice_mut(out_high, kk, "out_high")?.copy_from_slice(&high);
        }
        stat.copy_from_slice(&t.statistic);
        pval.copy_from_slice(&t.p_value);
        Ok(())
    })
}

/// The reference subprofile of a group of `n` profiles `x` (double, n × d row-major, finite): feature
/// j is kept when max(#(x_j >= 0), #(x_j < 0)) / n >= `threshold` (0 < threshold <= 1; 0.85 in the
/// LDM paper; zero counts as positive). Writes `out_mask[j]` (1 kept, 0 not) and `out_values[j]`
/// (the group median of feature j if kept, else NaN) for all d features (`out_len` >= d), and the
/// number of kept features to `*out_n_features` (may be NULL).
///
/// # Safety
/// `x` points to n × d doubles; `out_mask` and `out_values` to `out_len` writable elements;
/// `out_n_features` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_reference_subprofile(
    x: *const f64,
    n: usize,
    d: usize,
    threshold: f64,
    out_mask: *mut u8,
    out_values: *mut f64,
    out_len: usize,
    out_n_features: *mut usize,
) -> PhenoStatus {
    guard("pheno_reference_subprofile", || {
        if out_len < d {
            return Err(Error::Shape(format!("out_len is {out_len}; d is {d}")));
        }
        let rows = slice(x, checked_len::<f64>(&[n, d], "x")?, "x")?;
        let mask = slice_mut(out_mask, d, "out_mask")?;
        let vals = slice_mut(out_values, d, "out_values")?;
        let s = sub::reference_subprofile(rows, n, d, threshold)?;
        mask.fill(0);
        vals.fill(f64::NAN);
        for (&j, &v) in s.features.iter().zip(&s.values) {
            mask[j] = 1;
            vals[j] = v;
        }
        if !out_n_features.is_null() {
            write_out(out_n_features, s.features.len(), "out_n_features")?;
        }
        Ok(())
    })
}

/// Biosimilarity of each of the `n` profiles `x` (double, n × d row-major) to `reference` (d values,
/// e.g. `out_values` of `pheno_reference_subprofile`) over the features with `mask[j]` != 0 (all
/// features when `mask` is NULL). `form` is a `PhenoBiosimilarity`. Writes n values to `out`
/// (`out_len` >= n); the masked features must be finite.
///
/// # Safety
/// `x` points to n × d doubles, `reference` to d doubles, `mask` is NULL or points to d bytes, `out`
/// to `out_len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_biosimilarity(
    x: *const f64,
    n: usize,
    d: usize,
    reference: *const f64,
    mask: *const u8,
    form: i32,
    out: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_biosimilarity", || {
        let form = form_from(form, "form")?;
        if out_len < n {
            return Err(Error::Shape(format!("out_len is {out_len}; n is {n}")));
        }
        let rows = slice(x, checked_len::<f64>(&[n, d], "x")?, "x")?;
        let v = slice(reference, d, "reference")?;
        let features: Option<Vec<usize>> = if mask.is_null() {
            None
        } else {
            let m = slice(mask, d, "mask")?;
            Some((0..d).filter(|&j| m[j] != 0).collect())
        };
        let out = slice_mut(out, n, "out")?;
        for (i, o) in out.iter_mut().enumerate() {
            let u = &rows[i * d..(i + 1) * d];
            *o = sub::biosimilarity(u, v, features.as_deref(), form)
                .map_err(|e| Error::NonFinite(format!("x row {i} or reference: {e}")))?;
        }
        Ok(())
    })
}

fn subset_c(m: &SubsetMetrics) -> PhenoSubsetMetrics {
    PhenoSubsetMetrics {
        n_queries: m.n_queries,
        n_labels_scored: m.n_labels_scored,
        map: m.map,
        ap_macro: m.ap_macro,
        roc_auc_macro: m.roc_auc_macro,
        top1_accuracy: m.top1_accuracy,
    }
}

fn fold_c(f: &FoldMetrics) -> PhenoFoldMetrics {
    PhenoFoldMetrics {
        n_references: f.n_references,
        all: subset_c(&f.all),
        seen: subset_c(&f.seen),
        unseen: subset_c(&f.unseen),
    }
}

/// MoA / target prediction by nearest reference subprofile, the LDM paper's protocol (see
/// src/metrics/subprofile.rs for every rule). `x` (double, n × d row-major, finite) holds one
/// profile per compound, `labels` one `|`-joined annotation per compound (`n_labels` must equal n),
/// `seen` one flag per compound (non-zero = seen during the generative model's training; NULL = all
/// seen). With `references` NULL, `opts->n_folds` folds draw `opts->n_reference` reference compounds
/// per label (seeded); otherwise `references` gives `n_reference_folds` folds explicitly as
/// n_reference_folds × n row-major `|`-joined strings: the labels each compound is a reference for
/// in that fold ("" = none). Writes one `PhenoFoldMetrics` per fold to `out_folds` (`out_len` >=
/// folds), the number of folds to `*out_n_folds` and the number of labels taking part to
/// `*out_n_labels` (either may be NULL). `opts` may be NULL for the defaults.
///
/// # Safety
/// `x` points to n × d doubles; `labels` to n NUL-terminated strings; `seen` is NULL or points to n
/// bytes; `references` is NULL or points to n_reference_folds × n NUL-terminated strings; `opts` is
/// NULL or initialised by `pheno_prediction_default_options()`; `out_folds` points to `out_len`
/// writable structs; `out_n_folds` and `out_n_labels` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_moa_prediction(
    x: *const f64,
    n: usize,
    d: usize,
    labels: *const *const c_char,
    n_labels: usize,
    seen: *const u8,
    references: *const *const c_char,
    n_reference_folds: usize,
    opts: *const PhenoPredictionOptions,
    out_folds: *mut PhenoFoldMetrics,
    out_len: usize,
    out_n_folds: *mut usize,
    out_n_labels: *mut usize,
) -> PhenoStatus {
    guard("pheno_moa_prediction", || {
        let o = prediction_opts(opts)?;
        if n_labels != n {
            return Err(Error::Shape(format!(
                "n_labels is {n_labels} but there are {n} profiles"
            )));
        }
        let profiles = slice(x, checked_len::<f64>(&[n, d], "x")?, "x")?;
        let labels = Labels::from_joined(&c_str_array(labels, n, "labels")?);
        let seen: Option<Vec<bool>> = if seen.is_null() {
            None
        } else {
            Some(slice(seen, n, "seen")?.iter().map(|&b| b != 0).collect())
        };
        let p = if references.is_null() {
            if out_len < o.n_folds {
                return Err(Error::Shape(format!(
                    "out_len is {out_len}; opts->n_folds is {}",
                    o.n_folds
                )));
            }
            sub::moa_prediction(profiles, n, d, &labels, seen.as_deref(), &o)?
        } else {
            if out_len < n_reference_folds {
                return Err(Error::Shape(format!(
                    "out_len is {out_len}; {n_reference_folds} folds are given"
                )));
            }
            let cells = c_str_array(
                references,
                checked_len::<*const c_char>(&[n_reference_folds, n], "references")?,
                "references",
            )?;
            let e = sub::eligible(&labels, o.min_compounds, o.single_label);
            let refs = explicit_references(&cells, n, &e)?;
            sub::moa_prediction_with_references(profiles, n, d, &labels, seen.as_deref(), refs, &o)?
        };
        let out = slice_mut(out_folds, p.folds.len(), "out_folds")?;
        for (o, f) in out.iter_mut().zip(&p.folds) {
            *o = fold_c(f);
        }
        if !out_n_folds.is_null() {
            write_out(out_n_folds, p.folds.len(), "out_n_folds")?;
        }
        if !out_n_labels.is_null() {
            write_out(out_n_labels, p.eligible.labels.len(), "out_n_labels")?;
        }
        Ok(())
    })
}

/// `references[fold][label]` from fold-major `|`-joined reference cells; a name that is no kept
/// label is an error naming the cell.
fn explicit_references(cells: &[&str], n: usize, e: &sub::Eligible) -> Result<sub::References> {
    let mut folds = Vec::new();
    for (f, fold) in cells.chunks(n.max(1)).enumerate() {
        let mut per_label = vec![Vec::new(); e.labels.len()];
        for (i, cell) in fold.iter().enumerate() {
            for name in crate::io::profiles::split_labels(cell) {
                let l = e.labels.binary_search(&name).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "references[fold {f}][compound {i}]: {name:?} is not a label taking part \
                         (labels with enough eligible compounds: {})",
                        e.labels.join(", ")
                    ))
                })?;
                per_label[l].push(i);
            }
        }
        folds.push(per_label);
    }
    Ok(folds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_precision_over_the_abi() {
        let s = [0.1, 0.4, 0.35, 0.8];
        let t = [0u8, 0, 1, 1];
        let mut out = [0.0; 2];
        let st = unsafe {
            pheno_average_precision_score(s.as_ptr(), t.as_ptr(), 4, 1, 0, out.as_mut_ptr(), 1)
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        assert!((out[0] - 5.0 / 6.0).abs() < 1e-15);
        // 2 × 2 per label.
        let st =
            unsafe { pheno_roc_auc_score(s.as_ptr(), t.as_ptr(), 2, 2, 4, out.as_mut_ptr(), 2) };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        // Column 0: scores (0.1, 0.35), truth (0, 1) -> 1; column 1: (0.4, 0.8), truth (0, 1) -> 1.
        assert_eq!(out, [1.0, 1.0]);
        let st =
            unsafe { pheno_roc_auc_score(s.as_ptr(), t.as_ptr(), 2, 2, 4, out.as_mut_ptr(), 1) };
        assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);
        let st =
            unsafe { pheno_roc_auc_score(s.as_ptr(), t.as_ptr(), 2, 2, 9, out.as_mut_ptr(), 2) };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
        let st = unsafe {
            pheno_roc_auc_score(std::ptr::null(), t.as_ptr(), 2, 2, 0, out.as_mut_ptr(), 2)
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_NULL_POINTER);
        let bad = [0.1, f64::NAN];
        let st =
            unsafe { pheno_roc_auc_score(bad.as_ptr(), t.as_ptr(), 2, 1, 0, out.as_mut_ptr(), 2) };
        assert_eq!(st, PhenoStatus::PHENO_ERR_NON_FINITE);
    }

    #[test]
    fn options_prefix_and_bad_form() {
        let mut o = pheno_prediction_default_options();
        o.form = PhenoBiosimilarity::PHENO_BIOSIM_PAHL;
        o.single_label = 0;
        o.struct_size = offset_of!(PhenoPredictionOptions, form);
        let r = unsafe { prediction_opts(&o) }.unwrap();
        assert_eq!((r.form, r.single_label), (BiosimilarityForm::Pearson, true));
        o.struct_size = size_of::<PhenoPredictionOptions>();
        let r = unsafe { prediction_opts(&o) }.unwrap();
        assert_eq!((r.form, r.single_label), (BiosimilarityForm::Pahl, false));
        unsafe { (std::ptr::addr_of_mut!(o.form) as *mut i32).write(7) };
        assert!(unsafe { prediction_opts(&o) }.is_err());
    }
}
