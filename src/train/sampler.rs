//! Class-balanced epochs (REFERENCE §2, CP-CNN paper Methods; DeepProfiler
//! `sampled_crop_generator.py::balanced_sample`).
//!
//! Every class with at least one sample contributes exactly `m` indices per epoch, where
//! `m = ⌊median of the per-class counts over non-empty classes⌋` — DeepProfiler's
//! `int(counts.median())` with pandas' median, i.e. the mean of the two middle counts for an even
//! number of classes, truncated. A class with `n ≥ m` samples is subsampled without replacement; a
//! class with `n < m` contributes every sample `⌊m/n⌋` times plus `m mod n` further distinct samples
//! drawn without replacement, so each item appears `⌊m/n⌋` or `⌈m/n⌉` times. (DeepProfiler draws
//! small classes fully with replacement; the stratified form here has the same expectation and
//! lower variance.) The whole epoch is then shuffled. A fresh RNG state per epoch resamples anew.

use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// What `balanced_epoch_with_info` decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancedInfo {
    /// Indices drawn from every non-empty class (the median count).
    pub per_class: usize,
    /// Samples per class in the input (length `num_classes`).
    pub counts: Vec<usize>,
    /// Classes in `0..num_classes` with no samples (they contribute nothing; a warning, not an error).
    pub empty_classes: Vec<u32>,
}

/// Per-class counts, validating labels: a label ≥ `num_classes` is an error naming its index.
pub fn class_counts(labels: &[u32], num_classes: usize) -> Result<Vec<usize>> {
    if num_classes == 0 {
        return Err(Error::InvalidArgument(
            "balanced_epoch: num_classes must be positive".into(),
        ));
    }
    let mut counts = vec![0usize; num_classes];
    for (i, &l) in labels.iter().enumerate() {
        match counts.get_mut(l as usize) {
            Some(c) => *c += 1,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "labels[{i}] = {l} is out of range for {num_classes} classes"
                )))
            }
        }
    }
    Ok(counts)
}

/// `⌊median⌋` of the non-zero counts (pandas median, then `int()` as DeepProfiler does).
pub fn median_count(counts: &[usize]) -> Option<usize> {
    let mut nz: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
    if nz.is_empty() {
        return None;
    }
    nz.sort_unstable();
    let k = nz.len();
    Some(if k % 2 == 1 {
        nz[k / 2]
    } else {
        (nz[k / 2 - 1] + nz[k / 2]) / 2
    })
}

/// One balanced, shuffled epoch of sample indices (see the module doc); the order only.
pub fn balanced_epoch(
    labels: &[u32],
    num_classes: usize,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<usize>> {
    balanced_epoch_with_info(labels, num_classes, rng).map(|(order, _)| order)
}

/// One balanced, shuffled epoch plus what was decided (median, counts, empty classes).
/// Errors: `num_classes == 0`, a label out of range (naming its index and value), every class empty.
pub fn balanced_epoch_with_info(
    labels: &[u32],
    num_classes: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<usize>, BalancedInfo)> {
    let counts = class_counts(labels, num_classes)?;
    let per_class = median_count(&counts).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "balanced_epoch: no samples in any of the {num_classes} classes ({} labels)",
            labels.len()
        ))
    })?;
    let empty_classes: Vec<u32> = (0..num_classes as u32)
        .filter(|&c| counts[c as usize] == 0)
        .collect();

    // Indices grouped by class, ascending within a class (counting sort).
    let mut start = vec![0usize; num_classes + 1];
    for (c, &n) in counts.iter().enumerate() {
        start[c + 1] = start[c] + n;
    }
    let mut fill = start.clone();
    let mut grouped = vec![0usize; labels.len()];
    for (i, &l) in labels.iter().enumerate() {
        grouped[fill[l as usize]] = i;
        fill[l as usize] += 1;
    }

    let nonempty = num_classes - empty_classes.len();
    let mut order = Vec::with_capacity(per_class * nonempty);
    for c in 0..num_classes {
        let members = &mut grouped[start[c]..start[c + 1]];
        let n = members.len();
        if n == 0 {
            continue;
        }
        let (copies, rest) = (per_class / n, per_class % n);
        for _ in 0..copies {
            order.extend_from_slice(members);
        }
        let (chosen, _) = members.partial_shuffle(rng, rest);
        order.extend_from_slice(chosen);
    }
    order.shuffle(rng);
    Ok((
        order,
        BalancedInfo {
            per_class,
            counts,
            empty_classes,
        },
    ))
}

/// Splits an epoch order into batches of `batch_size`; the last, shorter batch is dropped when
/// `drop_last` (and kept otherwise).
pub fn batches(order: &[usize], batch_size: usize, drop_last: bool) -> Result<Vec<&[usize]>> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batches: batch_size must be positive".into(),
        ));
    }
    Ok(order
        .chunks(batch_size)
        .filter(|b| !drop_last || b.len() == batch_size)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn median_is_pandas_median_truncated() {
        assert_eq!(median_count(&[3, 0, 1, 10]), Some(3));
        assert_eq!(median_count(&[4, 1, 7, 10]), Some(5)); // (4 + 7) / 2 = 5.5 → 5
        assert_eq!(median_count(&[0, 0]), None);
    }

    #[test]
    fn every_class_gets_the_median_and_items_are_spread() {
        // counts 2, 0, 5, 9, 40 → median of (2, 5, 9, 40) = 7
        let mut labels = Vec::new();
        for (c, n) in [(0u32, 2), (2, 5), (3, 9), (4, 40)] {
            labels.extend(std::iter::repeat_n(c, n));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (order, info) = balanced_epoch_with_info(&labels, 5, &mut rng).unwrap();
        assert_eq!(info.per_class, 7);
        assert_eq!(info.empty_classes, vec![1]);
        assert_eq!(order.len(), 28);
        let mut per_class = [0usize; 5];
        let mut per_item = vec![0usize; labels.len()];
        for &i in &order {
            per_class[labels[i] as usize] += 1;
            per_item[i] += 1;
        }
        assert_eq!(per_class, [7, 0, 7, 7, 7]);
        // class 0: 2 items, 7 draws → 3 or 4 each; class 2: 5 items → 1 or 2; larger: 0 or 1
        for (i, &l) in labels.iter().enumerate() {
            let ok = match l {
                0 => (3..=4).contains(&per_item[i]),
                2 => (1..=2).contains(&per_item[i]),
                _ => per_item[i] <= 1,
            };
            assert!(ok, "item {i} (class {l}) drawn {} times", per_item[i]);
        }
        // not sorted by class: shuffled
        assert!(order.windows(2).any(|w| labels[w[0]] > labels[w[1]]));
    }

    #[test]
    fn errors_name_the_culprit() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let e = balanced_epoch(&[0, 1, 5], 3, &mut rng).unwrap_err();
        assert!(e.to_string().contains("labels[2] = 5"), "{e}");
        assert!(balanced_epoch(&[], 3, &mut rng).is_err());
        assert!(batches(&[1, 2], 0, false).is_err());
        let b = batches(&[1, 2, 3, 4, 5], 2, true).unwrap();
        assert_eq!(b, vec![&[1, 2][..], &[3, 4][..]]);
        assert_eq!(batches(&[1, 2, 3, 4, 5], 2, false).unwrap().len(), 3);
    }
}
