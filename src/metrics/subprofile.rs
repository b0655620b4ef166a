//! Reference subprofiles, Biosimilarity, and MoA / target prediction by nearest reference
//! subprofile (REFERENCE §8; Pahl et al. 2023 subprofile analysis as the LDM paper uses it).
//!
//! The prediction protocol of the LDM paper ("MoA and target identification via subprofiling",
//! "Evaluation metrics"), as implemented here:
//! 1. Eligible compounds: with `single_label`, only compounds annotated with exactly one label
//!    (the paper's single-MoA rule against polypharmacology; off for targets, where compounds carry
//!    several). Then labels with ≥ `min_compounds` eligible compounds are kept (the paper's ≥ 10),
//!    each compound's labels are restricted to the kept ones, and compounds left without a label
//!    are dropped. (Counting after the single-label filter guarantees every kept label can give
//!    `n_reference` references and still have queries.) Kept labels are sorted by name.
//! 2. Per fold (10): for each kept label, `n_reference` (5) distinct compounds carrying it are drawn
//!    uniformly, independently per label (so a multi-label compound may serve several labels, as
//!    the paper's 88–98 target reference compounds for 446 targets imply); the label's reference
//!    subprofile is built from exactly those. Draws come from ChaCha8 seeded with `seed`, labels
//!    in name order, folds in sequence.
//! 3. Queries are the eligible compounds that are no label's reference in that fold. Each gets the
//!    Biosimilarity to every reference subprofile; these are the scores of a nearest-neighbour
//!    classifier (prediction = the most similar label).
//! 4. Metrics per fold: mAP = mean over queries of the sklearn AP of the query's scores across
//!    labels against its true labels (eq. 4–5); macro ROC-AUC = mean over labels of the sklearn
//!    ROC-AUC of the label's scores across queries (eq. 7); also the macro AP over labels and the
//!    top-1 accuracy. A label whose queries are all positive or all negative (possible within the
//!    seen / unseen subsets) has no ROC-AUC (sklearn: NaN) and is left out of both macro averages;
//!    `n_labels_scored` says how many were averaged. An undefined Biosimilarity (fewer than 2
//!    subprofile features, or a constant vector; Pearson form) ranks below every defined one.
//! 5. Seen / unseen: in the paper, "seen" compounds were in the generative model's training set
//!    (their evaluated images come from batches not used in training) and "unseen" compounds were
//!    not in it at all. That is a property of the caller's data, so it is passed in per compound;
//!    references are drawn from both, and the query metrics are reported for all queries, the
//!    seen ones and the unseen ones.

use super::classification::{average_precision_unchecked, roc_auc_unchecked};
use super::Labels;
use crate::error::{Error, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Fraction of a group's profiles that must agree in sign for a feature to enter its subprofile
/// (Pahl et al. 2023; LDM paper: "greater than 85%", their code: `>= 0.85`).
pub const DEFAULT_CONSISTENCY: f64 = 0.85;

/// How Biosimilarity is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiosimilarityForm {
    /// Pearson correlation over the subprofile's features (LDM paper eq. 3), in [−1, 1]; NaN when
    /// undefined (fewer than 2 features or a constant vector).
    Pearson,
    /// Pahl et al.'s code (`cpa.profile_sim`, reported as `round(100 * sim, 1)`): both profiles
    /// clipped to ±25, Pearson correlation, negative or NaN → 0, as a percentage rounded to 0.1.
    Pahl,
}

impl BiosimilarityForm {
    pub fn parse(s: &str) -> Result<BiosimilarityForm> {
        match s {
            "pearson" => Ok(BiosimilarityForm::Pearson),
            "pahl" => Ok(BiosimilarityForm::Pahl),
            _ => Err(Error::InvalidArgument(format!(
                "Biosimilarity form {s:?}; expected \"pearson\" or \"pahl\""
            ))),
        }
    }
}

/// A reference subprofile: the directionally consistent features of a group and their medians.
#[derive(Clone, Debug, PartialEq)]
pub struct Subprofile {
    /// Kept feature indices, ascending.
    pub features: Vec<usize>,
    /// Median over the group of each kept feature.
    pub values: Vec<f64>,
}

impl Subprofile {
    /// Biosimilarity of a full profile (all `d` features) to this subprofile.
    pub fn biosimilarity(&self, profile: &[f64], form: BiosimilarityForm) -> f64 {
        let u = self.features.iter().map(|&j| profile[j]);
        similarity(u, self.values.iter().copied(), form)
    }
}

fn check_threshold(threshold: f64) -> Result<()> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "subprofile consistency threshold {threshold}; expected 0 < threshold <= 1"
        )));
    }
    Ok(())
}

/// The reference subprofile of a group of `n` profiles (`rows`, n × d row-major): feature j is kept
/// when max(#(v_j ≥ 0), #(v_j < 0)) / n ≥ `threshold` (zero counts as positive); its value is the
/// group median (mean of the two middle values for even n).
pub fn reference_subprofile(
    rows: &[f64],
    n: usize,
    d: usize,
    threshold: f64,
) -> Result<Subprofile> {
    check_threshold(threshold)?;
    if n == 0 {
        return Err(Error::InvalidArgument(
            "reference_subprofile: the group is empty".into(),
        ));
    }
    if n.checked_mul(d) != Some(rows.len()) {
        return Err(Error::shape_mismatch(
            "reference_subprofile: rows",
            &[n, d],
            &[rows.len()],
        ));
    }
    if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "reference_subprofile: profile {} feature {} is {}",
            i / d,
            i % d,
            rows[i]
        )));
    }
    Ok(subprofile_of(|i, j| rows[i * d + j], n, d, threshold))
}

fn subprofile_of(
    value: impl Fn(usize, usize) -> f64,
    n: usize,
    d: usize,
    threshold: f64,
) -> Subprofile {
    let mut out = Subprofile {
        features: Vec::new(),
        values: Vec::new(),
    };
    let mut column = vec![0.0; n];
    for j in 0..d {
        for (i, c) in column.iter_mut().enumerate() {
            *c = value(i, j);
        }
        let positive = column.iter().filter(|&&v| v >= 0.0).count();
        let agree = positive.max(n - positive);
        if agree as f64 / n as f64 >= threshold {
            column.sort_unstable_by(f64::total_cmp);
            let median = if n % 2 == 1 {
                column[n / 2]
            } else {
                0.5 * (column[n / 2 - 1] + column[n / 2])
            };
            out.features.push(j);
            out.values.push(median);
        }
    }
    out
}

/// Pearson correlation of two equally long sequences (two-pass; exactly ±1 for two values); NaN
/// when fewer than 2 values or either is constant.
fn pearson(u: impl Iterator<Item = f64> + Clone, v: impl Iterator<Item = f64> + Clone) -> f64 {
    let (mut n, mut su, mut sv) = (0usize, 0.0, 0.0);
    for (a, b) in u.clone().zip(v.clone()) {
        n += 1;
        su += a;
        sv += b;
    }
    if n < 2 {
        return f64::NAN;
    }
    if n == 2 {
        // Exactly ±1 (rounding would otherwise break the ties between 2-feature subprofiles).
        let mut pair = u.zip(v);
        let (a0, b0) = pair.next().unwrap_or_default();
        let (a1, b1) = pair.next().unwrap_or_default();
        let prod = (a1 - a0).signum() * (b1 - b0).signum();
        return if a1 == a0 || b1 == b0 { f64::NAN } else { prod };
    }
    let (mu, mv) = (su / n as f64, sv / n as f64);
    let (mut suv, mut suu, mut svv) = (0.0, 0.0, 0.0);
    for (a, b) in u.zip(v) {
        let (x, y) = (a - mu, b - mv);
        suv += x * y;
        suu += x * x;
        svv += y * y;
    }
    if suu == 0.0 || svv == 0.0 {
        return f64::NAN;
    }
    (suv / (suu.sqrt() * svv.sqrt())).clamp(-1.0, 1.0)
}

fn similarity(
    u: impl Iterator<Item = f64> + Clone,
    v: impl Iterator<Item = f64> + Clone,
    form: BiosimilarityForm,
) -> f64 {
    match form {
        BiosimilarityForm::Pearson => pearson(u, v),
        BiosimilarityForm::Pahl => {
            // Pahl et al. cpa.profile_sim: np.clip(±25), 1 − correlation distance, NaN/neg → 0.
            // …and `round(100 * sim, 1)` in their add_func_clusters. Clipping makes exact ties
            // (e.g. r = 1 for vectors equal after clipping) that rounding noise would otherwise break.
            let r = pearson(
                u.map(|x| x.clamp(-25.0, 25.0)),
                v.map(|x| x.clamp(-25.0, 25.0)),
            );
            if r > 0.0 {
                (1000.0 * r).round() / 10.0
            } else {
                0.0
            }
        }
    }
}

/// Biosimilarity of profiles `u` and `v` (same length d) over the feature indices `features`
/// (all features when `None`), LDM paper eq. 3 or Pahl's form.
pub fn biosimilarity(
    u: &[f64],
    v: &[f64],
    features: Option<&[usize]>,
    form: BiosimilarityForm,
) -> Result<f64> {
    if u.len() != v.len() {
        return Err(Error::Shape(format!(
            "biosimilarity: profiles of {} and {} features",
            u.len(),
            v.len()
        )));
    }
    let d = u.len();
    let check = |x: &[f64], what: &str, j: usize| {
        if x[j].is_finite() {
            Ok(())
        } else {
            Err(Error::NonFinite(format!(
                "biosimilarity: {what}[{j}] is {}",
                x[j]
            )))
        }
    };
    match features {
        Some(f) => {
            for &j in f {
                if j >= d {
                    return Err(Error::InvalidArgument(format!(
                        "biosimilarity: feature index {j} out of range for {d} features"
                    )));
                }
                check(u, "u", j)?;
                check(v, "v", j)?;
            }
            Ok(similarity(
                f.iter().map(|&j| u[j]),
                f.iter().map(|&j| v[j]),
                form,
            ))
        }
        None => {
            for j in 0..d {
                check(u, "u", j)?;
                check(v, "v", j)?;
            }
            Ok(similarity(u.iter().copied(), v.iter().copied(), form))
        }
    }
}

// ---- the prediction protocol ------------------------------------------------------------------

/// Options of the MoA / target prediction protocol; `Default` is the LDM paper's MoA setting.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PredictionOptions {
    /// Labels need at least this many eligible compounds (10).
    pub min_compounds: usize,
    /// Reference compounds drawn per label and fold (5).
    pub n_reference: usize,
    /// Folds (10).
    pub n_folds: usize,
    pub seed: u64,
    /// Subprofile consistency threshold (0.85).
    pub threshold: f64,
    pub form: BiosimilarityForm,
    /// Keep only compounds with exactly one label (true for MoAs; false for targets).
    pub single_label: bool,
}

impl Default for PredictionOptions {
    fn default() -> Self {
        PredictionOptions {
            min_compounds: 10,
            n_reference: 5,
            n_folds: 10,
            seed: 0,
            threshold: DEFAULT_CONSISTENCY,
            form: BiosimilarityForm::Pearson,
            single_label: true,
        }
    }
}

/// The compounds and labels the protocol evaluates (step 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Eligible {
    /// Kept labels, sorted by name.
    pub labels: Vec<String>,
    /// Eligible compounds (input row indices), ascending.
    pub compounds: Vec<usize>,
    /// Kept label ids (into `labels`) of each input row; empty for rows that are not eligible.
    pub compound_labels: Vec<Vec<usize>>,
    /// Eligible compounds (input row indices, ascending) carrying each kept label.
    pub members: Vec<Vec<usize>>,
}

/// Step 1 of the protocol: which compounds and labels take part.
pub fn eligible(labels: &Labels, min_compounds: usize, single_label: bool) -> Eligible {
    let candidate = |items: &Vec<u32>| !items.is_empty() && (!single_label || items.len() == 1);
    let mut counts = vec![0usize; labels.names.len()];
    for items in labels.items.iter().filter(|it| candidate(it)) {
        for &l in items {
            counts[l as usize] += 1;
        }
    }
    let mut kept: Vec<usize> = (0..labels.names.len())
        .filter(|&l| counts[l] >= min_compounds.max(1))
        .collect();
    kept.sort_by(|&a, &b| labels.names[a].cmp(&labels.names[b]));
    let mut new_id = vec![usize::MAX; labels.names.len()];
    for (id, &l) in kept.iter().enumerate() {
        new_id[l] = id;
    }
    let mut e = Eligible {
        labels: kept.iter().map(|&l| labels.names[l].clone()).collect(),
        compounds: Vec::new(),
        compound_labels: vec![Vec::new(); labels.len()],
        members: vec![Vec::new(); kept.len()],
    };
    for (i, items) in labels.items.iter().enumerate() {
        if !candidate(items) {
            continue;
        }
        let mut mine: Vec<usize> = items
            .iter()
            .map(|&l| new_id[l as usize])
            .filter(|&id| id != usize::MAX)
            .collect();
        if mine.is_empty() {
            continue;
        }
        mine.sort_unstable();
        for &id in &mine {
            e.members[id].push(i);
        }
        e.compounds.push(i);
        e.compound_labels[i] = mine;
    }
    e
}

/// `references[fold][label]`: input row indices of the label's reference compounds in that fold.
pub type References = Vec<Vec<Vec<usize>>>;

/// Step 2: `n_reference` distinct compounds per label and fold, drawn uniformly from the label's
/// members by ChaCha8 seeded with `seed` (labels in `e.labels` order, folds in sequence).
pub fn sample_references(
    e: &Eligible,
    n_reference: usize,
    n_folds: usize,
    seed: u64,
) -> Result<References> {
    if n_reference == 0 || n_folds == 0 {
        return Err(Error::InvalidArgument(format!(
            "moa_prediction: n_reference {n_reference} and n_folds {n_folds} must be >= 1"
        )));
    }
    if let Some((l, m)) = e
        .members
        .iter()
        .enumerate()
        .find(|(_, m)| m.len() < n_reference)
    {
        return Err(Error::InvalidArgument(format!(
            "moa_prediction: label {:?} has {} compounds, fewer than n_reference {n_reference}",
            e.labels[l],
            m.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok((0..n_folds)
        .map(|_| {
            e.members
                .iter()
                .map(|m| {
                    let mut picked: Vec<usize> = sample(&mut rng, m.len(), n_reference)
                        .into_iter()
                        .map(|k| m[k])
                        .collect();
                    picked.sort_unstable();
                    picked
                })
                .collect()
        })
        .collect())
}

/// Query metrics of one fold for one subset of the queries.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SubsetMetrics {
    pub n_queries: usize,
    /// Labels with both positive and negative queries: the ones the macro averages use.
    pub n_labels_scored: usize,
    /// Mean over queries of the AP of the query's label ranking (LDM paper eq. 4–5).
    pub map: f64,
    /// Mean over scored labels of the AP of the label's query ranking.
    pub ap_macro: f64,
    /// Mean over scored labels of the ROC-AUC (LDM paper eq. 7).
    pub roc_auc_macro: f64,
    /// Fraction of queries whose most similar subprofile (first label on ties) is one of theirs.
    pub top1_accuracy: f64,
}

/// The metrics of one fold: all queries, the seen ones, the unseen ones (NaN metrics and 0 counts
/// for an empty subset; without a seen mask every query counts as seen).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FoldMetrics {
    /// Distinct reference compounds of the fold.
    pub n_references: usize,
    pub all: SubsetMetrics,
    pub seen: SubsetMetrics,
    pub unseen: SubsetMetrics,
}

/// Biosimilarities of one fold's queries (rows) to its reference subprofiles (columns).
#[derive(Clone, Debug, PartialEq)]
pub struct FoldScores {
    /// Query compounds (input row indices), ascending.
    pub queries: Vec<usize>,
    /// queries × labels, row-major; NaN where undefined (Pearson form).
    pub scores: Vec<f64>,
    pub subprofiles: Vec<Subprofile>,
}

/// The result of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub eligible: Eligible,
    pub references: References,
    pub folds: Vec<FoldMetrics>,
}

fn check_profiles(profiles: &[f64], n: usize, d: usize, labels: &Labels) -> Result<()> {
    if n.checked_mul(d) != Some(profiles.len()) {
        return Err(Error::shape_mismatch(
            "moa_prediction: profiles",
            &[n, d],
            &[profiles.len()],
        ));
    }
    if labels.len() != n {
        return Err(Error::Shape(format!(
            "moa_prediction: {} label entries for {n} profiles",
            labels.len()
        )));
    }
    if let Some(i) = profiles.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "moa_prediction: profiles row {} column {} is {}",
            i / d,
            i % d,
            profiles[i]
        )));
    }
    Ok(())
}

/// Step 3 for one fold: subprofiles from `references[label]` and the queries' Biosimilarities.
/// `profiles` must be finite (n × d).
pub fn fold_scores(
    profiles: &[f64],
    d: usize,
    e: &Eligible,
    references: &[Vec<usize>],
    threshold: f64,
    form: BiosimilarityForm,
) -> Result<FoldScores> {
    check_threshold(threshold)?;
    if references.len() != e.labels.len() {
        return Err(Error::Shape(format!(
            "moa_prediction: references for {} labels, {} labels are kept",
            references.len(),
            e.labels.len()
        )));
    }
    let n = profiles
        .len()
        .checked_div(d)
        .unwrap_or(e.compound_labels.len());
    let mut is_reference = vec![false; n];
    for (l, refs) in references.iter().enumerate() {
        if refs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "moa_prediction: label {:?} has no reference compound",
                e.labels[l]
            )));
        }
        for (k, &i) in refs.iter().enumerate() {
            if i >= n || e.compound_labels[i].binary_search(&l).is_err() {
                return Err(Error::InvalidArgument(format!(
                    "moa_prediction: reference {i} of label {:?} is not an eligible compound with that label",
                    e.labels[l]
                )));
            }
            if refs[..k].contains(&i) {
                return Err(Error::InvalidArgument(format!(
                    "moa_prediction: reference {i} appears twice for label {:?}",
                    e.labels[l]
                )));
            }
            is_reference[i] = true;
        }
    }
    let subprofiles: Vec<Subprofile> = references
        .iter()
        .map(|refs| subprofile_of(|i, j| profiles[refs[i] * d + j], refs.len(), d, threshold))
        .collect();
    let queries: Vec<usize> = e
        .compounds
        .iter()
        .copied()
        .filter(|&i| !is_reference[i])
        .collect();
    let l = subprofiles.len();
    let mut scores = vec![0.0; queries.len() * l];
    crate::threads::install(|| {
        scores
            .par_chunks_mut(l.max(1))
            .zip(&queries)
            .for_each(|(row, &q)| {
                let u = &profiles[q * d..(q + 1) * d];
                for (s, sp) in row.iter_mut().zip(&subprofiles) {
                    *s = sp.biosimilarity(u, form);
                }
            })
    });
    Ok(FoldScores {
        queries,
        scores,
        subprofiles,
    })
}

/// Step 4 for the queries at positions `rows` of `fs`.
fn subset_metrics(fs: &FoldScores, e: &Eligible, rows: &[usize]) -> SubsetMetrics {
    let l = e.labels.len();
    let nan = f64::NAN;
    if rows.is_empty() || l == 0 {
        return SubsetMetrics {
            n_queries: rows.len(),
            n_labels_scored: 0,
            map: nan,
            ap_macro: nan,
            roc_auc_macro: nan,
            top1_accuracy: nan,
        };
    }
    // Undefined Biosimilarity ranks last.
    let score = |r: usize, c: usize| {
        let s = fs.scores[r * l + c];
        if s.is_nan() {
            f64::NEG_INFINITY
        } else {
            s
        }
    };
    let truth = |r: usize, c: usize| e.compound_labels[fs.queries[r]].binary_search(&c).is_ok();
    let (mut ap_sum, mut correct) = (0.0, 0usize);
    for &r in rows {
        let s: Vec<f64> = (0..l).map(|c| score(r, c)).collect();
        let t: Vec<bool> = (0..l).map(|c| truth(r, c)).collect();
        ap_sum += average_precision_unchecked(&s, &t);
        let best = (0..l).fold(0, |b, c| if s[c] > s[b] { c } else { b });
        correct += usize::from(t[best]);
    }
    let per_label: Vec<Option<(f64, f64)>> = (0..l)
        .into_par_iter()
        .map(|c| {
            let s: Vec<f64> = rows.iter().map(|&r| score(r, c)).collect();
            let t: Vec<bool> = rows.iter().map(|&r| truth(r, c)).collect();
            let auc = roc_auc_unchecked(&s, &t);
            (!auc.is_nan()).then(|| (average_precision_unchecked(&s, &t), auc))
        })
        .collect();
    let scored: Vec<(f64, f64)> = per_label.into_iter().flatten().collect();
    let k = scored.len() as f64;
    SubsetMetrics {
        n_queries: rows.len(),
        n_labels_scored: scored.len(),
        map: ap_sum / rows.len() as f64,
        ap_macro: if scored.is_empty() {
            nan
        } else {
            scored.iter().map(|x| x.0).sum::<f64>() / k
        },
        roc_auc_macro: if scored.is_empty() {
            nan
        } else {
            scored.iter().map(|x| x.1).sum::<f64>() / k
        },
        top1_accuracy: correct as f64 / rows.len() as f64,
    }
}

/// Metrics of one fold from its scores; `seen[i]` for input row i (None: all seen).
pub fn fold_metrics(fs: &FoldScores, e: &Eligible, seen: Option<&[bool]>) -> FoldMetrics {
    let all: Vec<usize> = (0..fs.queries.len()).collect();
    let is_seen = |r: &usize| seen.is_none_or(|s| s[fs.queries[*r]]);
    let seen_rows: Vec<usize> = all.iter().copied().filter(|r| is_seen(r)).collect();
    let unseen_rows: Vec<usize> = all.iter().copied().filter(|r| !is_seen(r)).collect();
    let n_references = e.compounds.len() - fs.queries.len();
    crate::threads::install(|| FoldMetrics {
        n_references,
        all: subset_metrics(fs, e, &all),
        seen: subset_metrics(fs, e, &seen_rows),
        unseen: subset_metrics(fs, e, &unseen_rows),
    })
}

/// The whole protocol with references drawn from `opts.seed`: `profiles` n × d row-major
/// (compound-level), `labels` one entry per row, `seen` one flag per row (None: all seen).
pub fn moa_prediction(
    profiles: &[f64],
    n: usize,
    d: usize,
    labels: &Labels,
    seen: Option<&[bool]>,
    opts: &PredictionOptions,
) -> Result<Prediction> {
    check_profiles(profiles, n, d, labels)?;
    let e = eligible(labels, opts.min_compounds, opts.single_label);
    if e.labels.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "moa_prediction: no label has >= {} eligible compounds",
            opts.min_compounds
        )));
    }
    let references = sample_references(&e, opts.n_reference, opts.n_folds, opts.seed)?;
    run_folds(profiles, n, d, e, references, seen, opts)
}

/// The protocol with given references (`references[fold][label]`, labels in the order of
/// `eligible(labels, opts.min_compounds, opts.single_label).labels`); `opts.n_reference`,
/// `n_folds` and `seed` are not used.
pub fn moa_prediction_with_references(
    profiles: &[f64],
    n: usize,
    d: usize,
    labels: &Labels,
    seen: Option<&[bool]>,
    references: References,
    opts: &PredictionOptions,
) -> Result<Prediction> {
    check_profiles(profiles, n, d, labels)?;
    let e = eligible(labels, opts.min_compounds, opts.single_label);
    if references.is_empty() {
        return Err(Error::InvalidArgument(
            "moa_prediction: no folds given".into(),
        ));
    }
    run_folds(profiles, n, d, e, references, seen, opts)
}

fn run_folds(
    profiles: &[f64],
    n: usize,
    d: usize,
    e: Eligible,
    references: References,
    seen: Option<&[bool]>,
    opts: &PredictionOptions,
) -> Result<Prediction> {
    if let Some(s) = seen {
        if s.len() != n {
            return Err(Error::Shape(format!(
                "moa_prediction: {} seen flags for {n} profiles",
                s.len()
            )));
        }
    }
    let folds = references
        .iter()
        .map(|refs| {
            let fs = fold_scores(profiles, d, &e, refs, opts.threshold, opts.form)?;
            Ok(fold_metrics(&fs, &e, seen))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Prediction {
        eligible: e,
        references,
        folds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprofile_keeps_consistent_features_and_takes_medians() {
        // 4 profiles × 3 features: feature 0 all ≥ 0 (a zero counts as positive), feature 1 split
        // 2/2, feature 2 three of four negative (0.75).
        let rows = [
            0.0, 1.0, -1.0, //
            2.0, -1.0, -2.0, //
            1.0, 3.0, -3.0, //
            5.0, -2.0, 4.0,
        ];
        let s = reference_subprofile(&rows, 4, 3, 0.85).unwrap();
        assert_eq!(s.features, vec![0]);
        assert_eq!(s.values, vec![1.5]);
        let s = reference_subprofile(&rows, 4, 3, 0.75).unwrap();
        assert_eq!(s.features, vec![0, 2]);
        assert_eq!(s.values, vec![1.5, -1.5]);
        assert!(reference_subprofile(&rows, 4, 3, 0.0).is_err());
        assert!(reference_subprofile(&rows, 3, 3, 0.85).is_err());
        assert!(reference_subprofile(&[], 0, 3, 0.85).is_err());
    }

    #[test]
    fn biosimilarity_forms() {
        let u = [1.0, 2.0, 3.0, 40.0];
        let v = [2.0, 4.0, 7.0, 30.0];
        let r = biosimilarity(&u, &v, Some(&[0, 1, 2]), BiosimilarityForm::Pearson).unwrap();
        let exact = 15.0 / 228.0f64.sqrt(); // Σxy = 5, Σx² = 2, Σy² = 114/9
        assert!((r - exact).abs() < 1e-15, "{r} vs {exact}");
        // Pahl: 40 and 30 clip to 25, then a percentage rounded to 0.1.
        let p = biosimilarity(&u, &v, None, BiosimilarityForm::Pahl).unwrap();
        let c = biosimilarity(
            &[1.0, 2.0, 3.0, 25.0],
            &[2.0, 4.0, 7.0, 25.0],
            None,
            BiosimilarityForm::Pearson,
        )
        .unwrap();
        assert_eq!(p, (1000.0 * c).round() / 10.0);
        assert!(p != 100.0 * c && (p - 100.0 * c).abs() <= 0.05);
        // Negative correlation and undefined → 0 in Pahl's form, NaN (undefined) in Pearson's.
        let neg = biosimilarity(&[1.0, 2.0], &[2.0, 1.0], None, BiosimilarityForm::Pahl).unwrap();
        assert_eq!(neg, 0.0);
        let one = biosimilarity(&u, &v, Some(&[1]), BiosimilarityForm::Pearson).unwrap();
        assert!(one.is_nan());
        assert_eq!(
            biosimilarity(&u, &v, Some(&[1]), BiosimilarityForm::Pahl).unwrap(),
            0.0
        );
        assert!(biosimilarity(&u, &v, Some(&[4]), BiosimilarityForm::Pahl).is_err());
        assert!(biosimilarity(&u, &v[..3], None, BiosimilarityForm::Pahl).is_err());
    }

    #[test]
    fn eligibility_and_sampling() {
        // "a": 3 single-label compounds, "b": 2 + one compound with "a|b"; min 2.
        let labels = Labels::from_joined(&["b", "a", "a|b", "a", "", "b", "a", "c"]);
        let e = eligible(&labels, 2, true);
        assert_eq!(e.labels, vec!["a", "b"]);
        assert_eq!(e.compounds, vec![0, 1, 3, 5, 6]);
        assert_eq!(e.members, vec![vec![1, 3, 6], vec![0, 5]]);
        // Without the single-label rule, "a|b" joins both.
        let e2 = eligible(&labels, 2, false);
        assert_eq!(e2.members, vec![vec![1, 2, 3, 6], vec![0, 2, 5]]);
        let r1 = sample_references(&e, 2, 3, 7).unwrap();
        let r2 = sample_references(&e, 2, 3, 7).unwrap();
        assert_eq!(r1, r2);
        for fold in &r1 {
            for (l, refs) in fold.iter().enumerate() {
                assert_eq!(refs.len(), 2);
                assert!(refs.iter().all(|i| e.members[l].contains(i)));
            }
        }
        assert!(sample_references(&e, 3, 1, 0).is_err()); // "b" has only 2
    }

    #[test]
    fn perfectly_separated_labels_score_one() {
        // Two labels with opposite-signed profiles; 6 compounds each, 2 references per label.
        let d = 6;
        let mut profiles = Vec::new();
        let mut cells = Vec::new();
        for i in 0..12 {
            let sign = if i < 6 { 1.0 } else { -1.0 };
            for j in 0..d {
                profiles.push(sign * (1.0 + j as f64) + 0.01 * ((i * 7 + j * 3) % 5) as f64);
            }
            cells.push(if i < 6 { "x" } else { "y" });
        }
        let labels = Labels::from_joined(&cells);
        let opts = PredictionOptions {
            min_compounds: 6,
            n_reference: 2,
            n_folds: 3,
            ..Default::default()
        };
        let seen: Vec<bool> = (0..12).map(|i| i % 2 == 0).collect();
        let p = moa_prediction(&profiles, 12, d, &labels, Some(&seen), &opts).unwrap();
        assert_eq!(p.folds.len(), 3);
        for f in &p.folds {
            assert_eq!(f.n_references, 4);
            assert_eq!(f.all.n_queries, 8);
            assert_eq!(f.seen.n_queries + f.unseen.n_queries, 8);
            for m in [f.all, f.seen, f.unseen] {
                assert_eq!((m.map, m.roc_auc_macro, m.top1_accuracy), (1.0, 1.0, 1.0));
            }
        }
    }
}
