//! Classification metrics with scikit-learn 1.9 semantics: average precision
//! (`average_precision_score`), ROC-AUC (`roc_auc_score`), their curves, and the multi-label
//! averages (`average="macro" | "micro" | "weighted" | "samples"`, or per label).
//!
//! Conventions shared by every function here:
//! - `scores` and `truth` have one entry per sample (binary) or are `n × n_labels` row-major
//!   (multi-label indicator matrix); scores must be finite (sklearn rejects NaN and ±inf too).
//! - Tied scores form one threshold (sklearn's `_binary_clf_curve`), so the order of tied samples
//!   never matters.
//! - No positive sample: average precision is 0 (sklearn 1.9 sets recall to 1 at every threshold,
//!   which makes the step sum 0, and warns). ROC-AUC with one class only is NaN (sklearn 1.9 warns
//!   `UndefinedMetricWarning` and returns NaN; older versions raised). A macro or samples average
//!   that contains a NaN is NaN, as in sklearn.

use crate::error::{Error, Result};
use rayon::prelude::*;

/// How the per-label scores of a multi-label problem are combined (sklearn's `average`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Average {
    /// Unweighted mean over labels.
    Macro,
    /// One binary problem over all `n × n_labels` entries.
    Micro,
    /// Mean over labels weighted by each label's number of positives (0 when there are none; a
    /// label without positives contributes 0 instead of its score, as in sklearn).
    Weighted,
    /// Mean over samples of the metric computed across each sample's labels.
    Samples,
}

impl Average {
    /// From sklearn's spelling: "macro", "micro", "weighted", "samples".
    pub fn parse(s: &str) -> Result<Average> {
        match s {
            "macro" => Ok(Average::Macro),
            "micro" => Ok(Average::Micro),
            "weighted" => Ok(Average::Weighted),
            "samples" => Ok(Average::Samples),
            _ => Err(Error::InvalidArgument(format!(
                "average {s:?}; expected \"macro\", \"micro\", \"weighted\" or \"samples\""
            ))),
        }
    }
}

/// Precision–recall pairs as sklearn's `precision_recall_curve` returns them: thresholds are the
/// distinct scores in increasing order; `precision` and `recall` have one more entry, the final
/// (precision 1, recall 0) point.
#[derive(Clone, Debug, PartialEq)]
pub struct PrecisionRecallCurve {
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// ROC curve as sklearn's `roc_curve`: starts at (0, 0) with threshold +inf, thresholds decrease.
#[derive(Clone, Debug, PartialEq)]
pub struct RocCurve {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// Cumulative true / false positives at each distinct score, scores decreasing.
struct Steps {
    tps: Vec<f64>,
    fps: Vec<f64>,
    thresholds: Vec<f64>,
}

impl Steps {
    /// `scores` must be NaN-free (checked by the callers).
    fn new(scores: &[f64], truth: &[bool]) -> Steps {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut s = Steps {
            tps: Vec::new(),
            fps: Vec::new(),
            thresholds: Vec::new(),
        };
        let (mut tp, mut fp) = (0usize, 0usize);
        for (k, &i) in order.iter().enumerate() {
            if truth[i] {
                tp += 1;
            } else {
                fp += 1;
            }
            // -0.0 == 0.0: one threshold, as numpy's diff sees it.
            let last_of_group = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
            if last_of_group {
                s.tps.push(tp as f64);
                s.fps.push(fp as f64);
                s.thresholds.push(scores[i]);
            }
        }
        s
    }

    fn positives(&self) -> f64 {
        self.tps.last().copied().unwrap_or(0.0)
    }

    fn negatives(&self) -> f64 {
        self.fps.last().copied().unwrap_or(0.0)
    }

    /// Σ (R_n − R_{n−1}) P_n over thresholds; 0 without positives (sklearn 1.9).
    fn average_precision(&self) -> f64 {
        let p = self.positives();
        if p == 0.0 {
            return 0.0;
        }
        let mut ap = 0.0;
        let mut prev_recall = 0.0;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            let recall = tp / p;
            ap += (recall - prev_recall) * (tp / (tp + fp));
            prev_recall = recall;
        }
        ap.max(0.0)
    }

    /// Trapezoidal area under (FPR, TPR) from (0, 0); NaN with one class only (sklearn 1.9).
    fn roc_auc(&self) -> f64 {
        let (p, n) = (self.positives(), self.negatives());
        if p == 0.0 || n == 0.0 {
            return f64::NAN;
        }
        let (mut area, mut x0, mut y0) = (0.0, 0.0, 0.0);
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            let (x, y) = (fp / n, tp / p);
            area += (x - x0) * (y + y0) / 2.0;
            (x0, y0) = (x, y);
        }
        area
    }
}

fn check_binary(scores: &[f64], truth: &[bool], what: &str) -> Result<()> {
    if scores.len() != truth.len() {
        return Err(Error::Shape(format!(
            "{what}: {} scores but {} truth values",
            scores.len(),
            truth.len()
        )));
    }
    if scores.is_empty() {
        return Err(Error::InvalidArgument(format!("{what}: no samples")));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{what}: scores[{i}] is {}",
            scores[i]
        )));
    }
    Ok(())
}

/// Binary average precision, sklearn's `average_precision_score(truth, scores)`:
/// AP = Σ_n (R_n − R_{n−1}) P_n over the distinct scores (LDM paper eq. 4); 0 when `truth` has
/// no positive.
pub fn average_precision_score(scores: &[f64], truth: &[bool]) -> Result<f64> {
    check_binary(scores, truth, "average_precision_score")?;
    Ok(Steps::new(scores, truth).average_precision())
}

/// Binary ROC-AUC, sklearn's `roc_auc_score(truth, scores)`: trapezoidal area under the ROC
/// curve, tied scores as one threshold; NaN when only one class is present (sklearn 1.9).
pub fn roc_auc_score(scores: &[f64], truth: &[bool]) -> Result<f64> {
    check_binary(scores, truth, "roc_auc_score")?;
    Ok(Steps::new(scores, truth).roc_auc())
}

/// sklearn's `precision_recall_curve(truth, scores)` (drop_intermediate=False). Without positives
/// the recall is 1 at every threshold, as sklearn 1.9 sets it.
pub fn precision_recall_curve(scores: &[f64], truth: &[bool]) -> Result<PrecisionRecallCurve> {
    check_binary(scores, truth, "precision_recall_curve")?;
    let s = Steps::new(scores, truth);
    let p = s.positives();
    let k = s.tps.len();
    let mut curve = PrecisionRecallCurve {
        precision: Vec::with_capacity(k + 1),
        recall: Vec::with_capacity(k + 1),
        thresholds: Vec::with_capacity(k),
    };
    for i in (0..k).rev() {
        let (tp, fp) = (s.tps[i], s.fps[i]);
        curve
            .precision
            .push(if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 });
        curve.recall.push(if p == 0.0 { 1.0 } else { tp / p });
        curve.thresholds.push(s.thresholds[i]);
    }
    curve.precision.push(1.0);
    curve.recall.push(0.0);
    Ok(curve)
}

/// sklearn's `roc_curve(truth, scores, drop_intermediate=...)`: FPR (NaN without negatives) and TPR
/// (NaN without positives) from (0, 0) at threshold +inf down the distinct scores;
/// `drop_intermediate` drops points collinear with their neighbours, as sklearn's default does.
pub fn roc_curve(scores: &[f64], truth: &[bool], drop_intermediate: bool) -> Result<RocCurve> {
    check_binary(scores, truth, "roc_curve")?;
    let s = Steps::new(scores, truth);
    let k = s.tps.len();
    let keep: Vec<usize> = if drop_intermediate && k > 2 {
        (0..k)
            .filter(|&i| {
                i == 0
                    || i == k - 1
                    || s.fps[i + 1] - 2.0 * s.fps[i] + s.fps[i - 1] != 0.0
                    || s.tps[i + 1] - 2.0 * s.tps[i] + s.tps[i - 1] != 0.0
            })
            .collect()
    } else {
        (0..k).collect()
    };
    let (p, n) = (s.positives(), s.negatives());
    let rate = |v: f64, total: f64| if total > 0.0 { v / total } else { f64::NAN };
    let mut curve = RocCurve {
        fpr: vec![rate(0.0, n)],
        tpr: vec![rate(0.0, p)],
        thresholds: vec![f64::INFINITY],
    };
    for i in keep {
        curve.fpr.push(rate(s.fps[i], n));
        curve.tpr.push(rate(s.tps[i], p));
        curve.thresholds.push(s.thresholds[i]);
    }
    Ok(curve)
}

/// Which binary metric a multi-label function applies per label / sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    AveragePrecision,
    RocAuc,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::AveragePrecision => "average_precision",
            Metric::RocAuc => "roc_auc",
        }
    }

    fn of(self, scores: &[f64], truth: &[bool]) -> f64 {
        let s = Steps::new(scores, truth);
        match self {
            Metric::AveragePrecision => s.average_precision(),
            Metric::RocAuc => s.roc_auc(),
        }
    }
}

fn check_matrix(
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
    what: &str,
) -> Result<(usize, usize)> {
    if n_labels == 0 {
        return Err(Error::InvalidArgument(format!("{what}: n_labels is 0")));
    }
    if scores.len() != truth.len() || !scores.len().is_multiple_of(n_labels) {
        return Err(Error::Shape(format!(
            "{what}: {} scores and {} truth values do not both form n × {n_labels} matrices",
            scores.len(),
            truth.len()
        )));
    }
    let n = scores.len() / n_labels;
    if n == 0 {
        return Err(Error::InvalidArgument(format!("{what}: no samples")));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{what}: scores[{}, {}] is {}",
            i / n_labels,
            i % n_labels,
            scores[i]
        )));
    }
    Ok((n, n_labels))
}

/// The metric of each column (`by_label`) or each row of an n × l matrix.
fn per_axis(metric: Metric, scores: &[f64], truth: &[bool], l: usize, by_label: bool) -> Vec<f64> {
    let n = scores.len() / l;
    let count = if by_label { l } else { n };
    crate::threads::install(|| {
        (0..count)
            .into_par_iter()
            .map(|c| {
                if by_label {
                    let s: Vec<f64> = (0..n).map(|i| scores[i * l + c]).collect();
                    let t: Vec<bool> = (0..n).map(|i| truth[i * l + c]).collect();
                    metric.of(&s, &t)
                } else {
                    metric.of(&scores[c * l..(c + 1) * l], &truth[c * l..(c + 1) * l])
                }
            })
            .collect()
    })
}

fn multilabel(
    metric: Metric,
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
    average: Average,
) -> Result<f64> {
    let (n, l) = check_matrix(scores, truth, n_labels, metric.name())?;
    if l == 1 {
        // An n × 1 indicator is binary to sklearn (type_of_target), and `average` is ignored.
        return Ok(metric.of(scores, truth));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(match average {
        Average::Micro => metric.of(scores, truth),
        Average::Macro => mean(&per_axis(metric, scores, truth, l, true)),
        Average::Samples => mean(&per_axis(metric, scores, truth, l, false)),
        Average::Weighted => {
            let weights: Vec<f64> = (0..l)
                .map(|c| (0..n).filter(|&i| truth[i * l + c]).count() as f64)
                .collect();
            let total: f64 = weights.iter().sum();
            if total == 0.0 {
                return Ok(0.0);
            }
            let per_label = per_axis(metric, scores, truth, l, true);
            per_label
                .iter()
                .zip(&weights)
                .map(|(&v, &w)| if w == 0.0 { 0.0 } else { v * w })
                .sum::<f64>()
                / total
        }
    })
}

/// Average precision of a multi-label problem: `scores` and `truth` are `n × n_labels` row-major,
/// combined as sklearn's `average_precision_score(truth, scores, average=...)`. With
/// `n_labels == 1` this is the binary score. `Average::Samples` is the LDM paper's mAP (eq. 5:
/// the mean over samples of each sample's AP across labels).
pub fn average_precision_multilabel(
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
    average: Average,
) -> Result<f64> {
    multilabel(Metric::AveragePrecision, scores, truth, n_labels, average)
}

/// ROC-AUC of a multi-label problem, sklearn's `roc_auc_score(truth, scores, average=...)` on an
/// `n × n_labels` indicator matrix. `Average::Macro` is the LDM paper's eq. 7; it is NaN when any
/// label has only one class (use `roc_auc_per_label` and skip those to average the rest).
pub fn roc_auc_multilabel(
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
    average: Average,
) -> Result<f64> {
    multilabel(Metric::RocAuc, scores, truth, n_labels, average)
}

/// Average precision of each label (column) of an `n × n_labels` matrix (sklearn `average=None`).
pub fn average_precision_per_label(
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
) -> Result<Vec<f64>> {
    let (_, l) = check_matrix(scores, truth, n_labels, "average_precision")?;
    Ok(per_axis(Metric::AveragePrecision, scores, truth, l, true))
}

/// ROC-AUC of each label (column) of an `n × n_labels` matrix (sklearn `average=None`); NaN for
/// labels with one class only.
pub fn roc_auc_per_label(scores: &[f64], truth: &[bool], n_labels: usize) -> Result<Vec<f64>> {
    let (_, l) = check_matrix(scores, truth, n_labels, "roc_auc")?;
    Ok(per_axis(Metric::RocAuc, scores, truth, l, true))
}

/// Average precision of each sample (row) across its labels: the terms of the LDM paper's mAP.
pub fn average_precision_per_sample(
    scores: &[f64],
    truth: &[bool],
    n_labels: usize,
) -> Result<Vec<f64>> {
    let (_, l) = check_matrix(scores, truth, n_labels, "average_precision")?;
    Ok(per_axis(Metric::AveragePrecision, scores, truth, l, false))
}

/// AP and ROC-AUC for scores already known to be NaN-free (−inf allowed: it ranks last).
pub(crate) fn average_precision_unchecked(scores: &[f64], truth: &[bool]) -> f64 {
    Steps::new(scores, truth).average_precision()
}

pub(crate) fn roc_auc_unchecked(scores: &[f64], truth: &[bool]) -> f64 {
    Steps::new(scores, truth).roc_auc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: &[u8]) -> Vec<bool> {
        v.iter().map(|&x| x != 0).collect()
    }

    #[test]
    fn sklearn_docstring_examples() {
        // sklearn average_precision_score docstring: 0.83 (= 5/6 exactly).
        let ap = average_precision_score(&[0.1, 0.4, 0.35, 0.8], &b(&[0, 0, 1, 1])).unwrap();
        assert!((ap - 5.0 / 6.0).abs() < 1e-15, "{ap}");
        // roc_auc_score docstring-like: 3 of 4 (pos, neg) pairs ordered.
        let auc = roc_auc_score(&[0.1, 0.4, 0.35, 0.8], &b(&[0, 0, 1, 1])).unwrap();
        assert!((auc - 0.75).abs() < 1e-15, "{auc}");
    }

    #[test]
    fn ties_are_one_threshold_and_auc_counts_half() {
        // All scores tied: one threshold, AP = prevalence, AUC = 1/2.
        let t = b(&[1, 0, 0, 1, 0]);
        let s = [0.3; 5];
        assert!((average_precision_score(&s, &t).unwrap() - 0.4).abs() < 1e-15);
        assert!((roc_auc_score(&s, &t).unwrap() - 0.5).abs() < 1e-15);
        // AUC equals the Mann–Whitney probability with ties counted 1/2.
        let s = [0.9, 0.5, 0.5, 0.5, 0.1, 0.1];
        let t = b(&[1, 1, 0, 0, 1, 0]);
        let (mut wins, mut pairs) = (0.0, 0.0);
        for i in 0..6 {
            for j in 0..6 {
                if t[i] && !t[j] {
                    pairs += 1.0;
                    wins += if s[i] > s[j] {
                        1.0
                    } else if s[i] == s[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        assert!((roc_auc_score(&s, &t).unwrap() - wins / pairs).abs() < 1e-15);
        // -0.0 and 0.0 are one threshold.
        let a = average_precision_score(&[0.0, -0.0, 1.0], &b(&[0, 1, 0])).unwrap();
        assert!((a - 1.0 / 3.0).abs() < 1e-15, "{a}");
    }

    #[test]
    fn one_class_conventions_and_errors() {
        assert_eq!(
            average_precision_score(&[0.2, 0.1], &b(&[0, 0])).unwrap(),
            0.0
        );
        assert!(roc_auc_score(&[0.2, 0.1], &b(&[1, 1])).unwrap().is_nan());
        assert!(matches!(
            average_precision_score(&[f64::NAN], &b(&[1])),
            Err(Error::NonFinite(_))
        ));
        assert!(matches!(
            roc_auc_score(&[], &[]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(roc_auc_score(&[1.0], &[]), Err(Error::Shape(_))));
        assert!(Average::parse("median").is_err());
    }

    #[test]
    fn curves_match_sklearn_layout() {
        let c = precision_recall_curve(&[0.1, 0.4, 0.35, 0.8], &b(&[0, 0, 1, 1])).unwrap();
        // sklearn: precision [0.5, 0.667, 0.5, 1, 1], recall [1, 1, 0.5, 0.5, 0], thresholds ascending.
        let p = [0.5, 2.0 / 3.0, 0.5, 1.0, 1.0];
        let r = [1.0, 1.0, 0.5, 0.5, 0.0];
        assert!(c
            .precision
            .iter()
            .zip(p)
            .all(|(a, b)| (a - b).abs() < 1e-15));
        assert_eq!(c.recall, r);
        assert_eq!(c.thresholds, vec![0.1, 0.35, 0.4, 0.8]);
        let r = roc_curve(&[0.1, 0.4, 0.35, 0.8], &b(&[0, 0, 1, 1]), true).unwrap();
        // sklearn: fpr [0, 0, 0.5, 0.5, 1], tpr [0, 0.5, 0.5, 1, 1], thresholds [inf, 0.8, 0.4, 0.35, 0.1].
        assert_eq!(r.fpr, vec![0.0, 0.0, 0.5, 0.5, 1.0]);
        assert_eq!(r.tpr, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
        assert_eq!(r.thresholds[1..], [0.8, 0.4, 0.35, 0.1]);
    }

    #[test]
    fn multilabel_averages() {
        // 3 samples × 2 labels; label 0 all positive.
        let y = b(&[1, 0, 1, 1, 1, 0]);
        let s = [0.3, 0.7, 0.2, 0.9, 0.5, 0.1];
        let auc = roc_auc_per_label(&s, &y, 2).unwrap();
        assert!(auc[0].is_nan() && auc[1] == 1.0);
        assert!(roc_auc_multilabel(&s, &y, 2, Average::Macro)
            .unwrap()
            .is_nan());
        // Weighted: weights (3, 1), the NaN label has weight 3 -> NaN.
        assert!(roc_auc_multilabel(&s, &y, 2, Average::Weighted)
            .unwrap()
            .is_nan());
        let ap = average_precision_per_label(&s, &y, 2).unwrap();
        assert_eq!(ap, vec![1.0, 1.0]);
        let per_sample = average_precision_per_sample(&s, &y, 2).unwrap();
        // Row 0: positive ranked second of two -> 1/2; rows 1, 2: 1.
        assert_eq!(per_sample, vec![0.5, 1.0, 1.0]);
        let m = average_precision_multilabel(&s, &y, 2, Average::Samples).unwrap();
        assert!((m - 2.5 / 3.0).abs() < 1e-15);
        // n × 1 is binary.
        let one = average_precision_multilabel(
            &[0.1, 0.4, 0.35, 0.8],
            &b(&[0, 0, 1, 1]),
            1,
            Average::Samples,
        )
        .unwrap();
        assert!((one - 5.0 / 6.0).abs() < 1e-15);
    }
}
