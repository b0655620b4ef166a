//! Validation metrics of a classifier (REFERENCE §2: per-class precision, recall, F1, accuracy,
//! top-k) with scikit-learn 1.9 semantics over the labels `0..num_classes` (as if `labels=range(k)`
//! were passed):
//! - prediction = first maximal logit (`np.argmax`);
//! - per class: `precision_recall_fscore_support(zero_division=0)`: precision tp/(tp+fp), recall
//!   tp/(tp+fn), F1 2tp/(2tp+fp+fn), each 0 when its denominator is 0 — so a class with neither
//!   support nor predictions scores 0 and still counts in the macro averages;
//! - macro = unweighted mean over all `num_classes` classes; weighted F1 = support-weighted mean
//!   (0 when there is no support at all);
//! - top-k: `top_k_accuracy_score(labels=range(k))`, which ranks with a stable ascending sort
//!   reversed, so among equal scores the *higher* class index ranks first (top-1 may thus differ
//!   from `accuracy` on exact ties); k ≥ num_classes gives 1;
//! - confusion: `confusion_matrix`, row = true class, column = predicted, row-major k × k.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClassStats {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClassReport {
    pub per_class: Vec<ClassStats>,
    pub accuracy: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub weighted_f1: f64,
    /// `(k, top-k accuracy)` in the order of `ks`.
    pub top_k: Vec<(usize, f64)>,
    /// `num_classes × num_classes`, row = true, column = predicted.
    pub confusion: Vec<u64>,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Evaluates `n × num_classes` row-major logits (or probabilities) against `labels`.
/// Errors: empty input, length mismatch, a label out of range (index and value), a non-finite
/// logit (`NonFinite` naming row and column), k = 0 in `ks`.
pub fn evaluate(
    logits: &[f32],
    n: usize,
    num_classes: usize,
    labels: &[u32],
    ks: &[usize],
) -> Result<ClassReport> {
    let k = num_classes;
    if n == 0 || k == 0 {
        return Err(Error::InvalidArgument(format!(
            "evaluate: need n > 0 and num_classes > 0, got n={n}, num_classes={k}"
        )));
    }
    let expected = n
        .checked_mul(k)
        .ok_or_else(|| Error::Shape(format!("evaluate: {n} × {k} overflows")))?;
    if logits.len() != expected {
        return Err(Error::shape_mismatch(
            "evaluate: logits",
            &[n, k],
            &[logits.len()],
        ));
    }
    if labels.len() != n {
        return Err(Error::shape_mismatch(
            "evaluate: labels",
            &[n],
            &[labels.len()],
        ));
    }
    if let Some(&bad) = ks.iter().find(|&&kk| kk == 0) {
        return Err(Error::InvalidArgument(format!(
            "evaluate: top-k needs k >= 1, got {bad}"
        )));
    }
    for (i, &l) in labels.iter().enumerate() {
        if l as usize >= k {
            return Err(Error::InvalidArgument(format!(
                "evaluate: labels[{i}] = {l} is out of range for {k} classes"
            )));
        }
    }
    if let Some(pos) = logits.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "evaluate: logits row {} column {} is {}",
            pos / k,
            pos % k,
            logits[pos]
        )));
    }

    let mut confusion = vec![0u64; k * k];
    let mut hits = vec![0u64; ks.len()];
    for (row, &y) in logits.chunks_exact(k).zip(labels) {
        let y = y as usize;
        let mut pred = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[pred] {
                pred = j;
            }
        }
        confusion[y * k + pred] += 1;
        // rank of the true class: classes with a higher score, or an equal score and higher index
        let sy = row[y];
        let ahead = row
            .iter()
            .enumerate()
            .filter(|&(j, &v)| v > sy || (v == sy && j > y))
            .count();
        for (h, &kk) in hits.iter_mut().zip(ks) {
            if ahead < kk {
                *h += 1;
            }
        }
    }

    let mut per_class = Vec::with_capacity(k);
    let mut correct = 0u64;
    for c in 0..k {
        let tp = confusion[c * k + c];
        let support: u64 = confusion[c * k..(c + 1) * k].iter().sum();
        let predicted: u64 = (0..k).map(|r| confusion[r * k + c]).sum();
        let (fp, fneg) = (predicted - tp, support - tp);
        correct += tp;
        per_class.push(ClassStats {
            precision: ratio(tp, predicted),
            recall: ratio(tp, support),
            f1: if 2 * tp + fp + fneg == 0 {
                0.0
            } else {
                2.0 * tp as f64 / (2 * tp + fp + fneg) as f64
            },
            support,
        });
    }
    let mean = |f: fn(&ClassStats) -> f64| per_class.iter().map(f).sum::<f64>() / k as f64;
    let total = n as u64;
    let weighted_f1 = per_class
        .iter()
        .map(|s| s.f1 * s.support as f64)
        .sum::<f64>()
        / total as f64;
    Ok(ClassReport {
        accuracy: ratio(correct, total),
        macro_precision: mean(|s| s.precision),
        macro_recall: mean(|s| s.recall),
        macro_f1: mean(|s| s.f1),
        weighted_f1,
        top_k: ks
            .iter()
            .zip(&hits)
            .map(|(&kk, &h)| (kk, ratio(h, total)))
            .collect(),
        confusion,
        per_class,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_closed_form() {
        // 3 classes; class 2 never true nor predicted
        let logits = [
            2.0, 1.0, 0.0, // pred 0, true 0
            0.0, 3.0, 0.0, // pred 1, true 0
            0.0, 1.0, 0.5, // pred 1, true 1
            1.0, 1.0, 1.0, // pred 0 (first max), true 1; top-1 by sklearn ranks class 2 first
        ];
        let r = evaluate(&logits, 4, 3, &[0, 0, 1, 1], &[1, 2]).unwrap();
        assert_eq!(r.confusion, vec![1, 1, 0, 1, 1, 0, 0, 0, 0]);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.per_class[0].precision, 0.5);
        assert_eq!(r.per_class[2].f1, 0.0);
        assert!((r.macro_f1 - (0.5 + 0.5 + 0.0) / 3.0).abs() < 1e-15);
        // top-1: rows 0 and 2. Row 3: class 2 ties and has a higher index → rank 2 → hit at k=2.
        // Row 1: class 1 scores higher and class 2 ties with a higher index → rank 3 → miss.
        assert_eq!(r.top_k, vec![(1, 0.5), (2, 0.75)]);
        let e = evaluate(&[0.0, f32::NAN, 0.0, 0.0], 2, 2, &[0, 1], &[1]).unwrap_err();
        assert!(
            matches!(e, Error::NonFinite(ref m) if m.contains("row 0 column 1")),
            "{e}"
        );
        assert!(evaluate(&logits, 4, 3, &[0, 0, 1, 3], &[1]).is_err());
        assert!(evaluate(&logits, 4, 3, &[0, 0, 1, 1], &[0]).is_err());
    }
}
