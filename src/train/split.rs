//! Training / validation splits (REFERENCE §2): leave-cells-out (per well ~60 % of the cells train,
//! the rest validation) and leave-plates-out (whole plates held out so each treatment keeps
//! replicate wells in validation).
//!
//! A well is identified by the pair (plate, well id): well "A01" of two plates are two replicate
//! wells.

use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// Sample indices of the two sides, each ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// Leave-cells-out: within every group (well) of `n` cells, `round(train_fraction·n)` cells chosen
/// uniformly without replacement go to training (rounding half away from zero), the rest to
/// validation. `groups[i]` is cell i's well id (any u32 coding, e.g. plate·384 + well).
pub fn leave_cells_out(groups: &[u32], train_fraction: f64, rng: &mut ChaCha8Rng) -> Result<Split> {
    if !(train_fraction.is_finite() && (0.0..=1.0).contains(&train_fraction)) {
        return Err(Error::InvalidArgument(format!(
            "leave_cells_out: train_fraction must be in [0, 1], got {train_fraction}"
        )));
    }
    let mut by_group: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        by_group.entry(g).or_default().push(i);
    }
    let mut split = Split::default();
    for members in by_group.values_mut() {
        let k = ((train_fraction * members.len() as f64).round() as usize).min(members.len());
        let (chosen, rest) = members.partial_shuffle(rng, k);
        split.train.extend_from_slice(chosen);
        split.val.extend_from_slice(rest);
    }
    split.train.sort_unstable();
    split.val.sort_unstable();
    Ok(split)
}

/// A leave-plates-out split and how many replicate wells each treatment has on each side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlateSplit {
    pub split: Split,
    /// `(treatment, distinct (plate, well) pairs in validation)` for every treatment, ascending.
    pub val_wells: Vec<(u32, usize)>,
    /// `(treatment, distinct (plate, well) pairs in training)` for every treatment, ascending.
    pub train_wells: Vec<(u32, usize)>,
    /// Treatments with no validation well (they cannot be validated).
    pub missing_in_val: Vec<u32>,
    /// Treatments with no training well (the model never sees them).
    pub missing_in_train: Vec<u32>,
}

fn check_lengths(what: &str, plates: &[u32], treatments: &[u32], wells: &[u32]) -> Result<()> {
    if plates.len() != treatments.len() || plates.len() != wells.len() {
        return Err(Error::InvalidArgument(format!(
            "{what}: plates ({}), treatments ({}) and wells ({}) must have one entry per cell",
            plates.len(),
            treatments.len(),
            wells.len()
        )));
    }
    Ok(())
}

/// treatment → its distinct (plate, well) pairs.
type WellsByTreatment = BTreeMap<u32, BTreeSet<(u32, u32)>>;

/// Distinct (plate, well) pairs per treatment, split by whether the plate is in `held`.
fn wells_per_treatment(
    plates: &[u32],
    treatments: &[u32],
    wells: &[u32],
    held: &BTreeSet<u32>,
) -> (WellsByTreatment, WellsByTreatment) {
    let (mut train, mut val): (WellsByTreatment, WellsByTreatment) = Default::default();
    for i in 0..plates.len() {
        train.entry(treatments[i]).or_default();
        val.entry(treatments[i]).or_default();
        let side = if held.contains(&plates[i]) {
            &mut val
        } else {
            &mut train
        };
        side.entry(treatments[i])
            .or_default()
            .insert((plates[i], wells[i]));
    }
    (train, val)
}

/// Leave-plates-out: cells on `val_plates` go to validation, all others to training. Errors: length
/// mismatch, an empty or duplicated `val_plates`, or validation plates that hold no cells (named).
/// Treatments left without validation (or training) wells are reported, not rejected.
pub fn leave_plates_out(
    plates: &[u32],
    treatments: &[u32],
    wells: &[u32],
    val_plates: &[u32],
) -> Result<PlateSplit> {
    check_lengths("leave_plates_out", plates, treatments, wells)?;
    if val_plates.is_empty() {
        return Err(Error::InvalidArgument(
            "leave_plates_out: val_plates is empty".into(),
        ));
    }
    let held: BTreeSet<u32> = val_plates.iter().copied().collect();
    if held.len() != val_plates.len() {
        return Err(Error::InvalidArgument(format!(
            "leave_plates_out: val_plates has duplicates: {val_plates:?}"
        )));
    }
    let present: BTreeSet<u32> = plates.iter().copied().collect();
    let unknown: Vec<u32> = held.difference(&present).copied().collect();
    if !unknown.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "leave_plates_out: validation plates {unknown:?} have no cells (plates present: {:?})",
            present
        )));
    }
    let mut split = Split::default();
    for (i, p) in plates.iter().enumerate() {
        if held.contains(p) {
            split.val.push(i);
        } else {
            split.train.push(i);
        }
    }
    let (train, val) = wells_per_treatment(plates, treatments, wells, &held);
    let count = |m: &WellsByTreatment| -> Vec<(u32, usize)> {
        m.iter().map(|(&t, s)| (t, s.len())).collect()
    };
    let missing = |m: &WellsByTreatment| -> Vec<u32> {
        m.iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(&t, _)| t)
            .collect()
    };
    Ok(PlateSplit {
        split,
        val_wells: count(&val),
        train_wells: count(&train),
        missing_in_val: missing(&val),
        missing_in_train: missing(&train),
    })
}

/// Chooses validation plates so that each treatment gets `wells_per_treatment` (REFERENCE §2: two)
/// replicate wells in validation where possible, while keeping at least one training well for every
/// treatment. Greedy rule: the deficit is Σ over treatments of
/// `max(0, min(wells_per_treatment, total wells − 1) − wells in validation)`; at each step add the
/// plate that lowers the deficit most, ties broken by fewer cells, then the lower plate id; a plate
/// that would leave some treatment without a training well is never added. Stops when the deficit
/// is 0 or no plate lowers it. Returns the chosen plates ascending (possibly empty).
pub fn choose_val_plates(
    plates: &[u32],
    treatments: &[u32],
    wells: &[u32],
    wells_per_treatment: usize,
) -> Result<Vec<u32>> {
    check_lengths("choose_val_plates", plates, treatments, wells)?;
    // treatment → plate → distinct wells of that treatment on that plate
    let mut tw: BTreeMap<u32, BTreeMap<u32, BTreeSet<u32>>> = BTreeMap::new();
    let mut cells: BTreeMap<u32, usize> = BTreeMap::new();
    for i in 0..plates.len() {
        tw.entry(treatments[i])
            .or_default()
            .entry(plates[i])
            .or_default()
            .insert(wells[i]);
        *cells.entry(plates[i]).or_default() += 1;
    }
    let table: Vec<(usize, BTreeMap<u32, usize>)> = tw
        .values()
        .map(|per_plate| {
            let counts: BTreeMap<u32, usize> =
                per_plate.iter().map(|(&p, w)| (p, w.len())).collect();
            (counts.values().sum(), counts)
        })
        .collect();
    let target: Vec<usize> = table
        .iter()
        .map(|(total, _)| wells_per_treatment.min(total.saturating_sub(1)))
        .collect();
    let mut in_val = vec![0usize; table.len()];
    let mut chosen: BTreeSet<u32> = BTreeSet::new();
    loop {
        let deficit = |v: &[usize]| -> usize {
            v.iter()
                .zip(&target)
                .map(|(&x, &t)| t.saturating_sub(x))
                .sum()
        };
        let now = deficit(&in_val);
        if now == 0 {
            break;
        }
        let mut best: Option<(usize, usize, u32)> = None; // (deficit, cells, plate)
        for (&plate, &n) in &cells {
            if chosen.contains(&plate) {
                continue;
            }
            let after: Vec<usize> = table
                .iter()
                .zip(&in_val)
                .map(|((_, counts), &x)| x + counts.get(&plate).copied().unwrap_or(0))
                .collect();
            if after.iter().zip(&table).any(|(&x, (total, _))| x >= *total) {
                continue;
            }
            let d = deficit(&after);
            if d < now && best.is_none_or(|b| (d, n, plate) < b) {
                best = Some((d, n, plate));
            }
        }
        let Some((_, _, plate)) = best else { break };
        chosen.insert(plate);
        for ((_, counts), x) in table.iter().zip(in_val.iter_mut()) {
            *x += counts.get(&plate).copied().unwrap_or(0);
        }
    }
    Ok(chosen.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn leave_cells_out_rounds_per_well() {
        // wells of 10, 5, 1 cells; 0.6 → 6, 3, 1 (round(0.6) = 1) to train
        let groups: Vec<u32> = [7u32; 10]
            .iter()
            .chain(&[3u32; 5])
            .chain(&[9u32; 1])
            .copied()
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let s = leave_cells_out(&groups, 0.6, &mut rng).unwrap();
        let count = |v: &[usize], g: u32| v.iter().filter(|&&i| groups[i] == g).count();
        assert_eq!((count(&s.train, 7), count(&s.val, 7)), (6, 4));
        assert_eq!((count(&s.train, 3), count(&s.val, 3)), (3, 2));
        assert_eq!((count(&s.train, 9), count(&s.val, 9)), (1, 0));
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert!(leave_cells_out(&groups, 1.5, &mut rng).is_err());
        assert!(leave_cells_out(&groups, f64::NAN, &mut rng).is_err());
    }

    /// 4 plates; treatment 0 (control) in 2 wells per plate; treatments 1, 2 in one well per plate
    /// on plates 0..3; treatment 3 only on plate 3.
    fn layout() -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let (mut p, mut t, mut w) = (vec![], vec![], vec![]);
        for plate in 0..4u32 {
            let mut wells = vec![(0u32, 0u32), (0, 1)];
            if plate < 3 {
                wells.extend([(1, 2), (2, 3)]);
            } else {
                wells.push((3, 4));
            }
            for (tr, well) in wells {
                for _ in 0..3 {
                    p.push(plate);
                    t.push(tr);
                    w.push(well);
                }
            }
        }
        (p, t, w)
    }

    #[test]
    fn leave_plates_out_reports_wells() {
        let (p, t, w) = layout();
        let s = leave_plates_out(&p, &t, &w, &[1, 3]).unwrap();
        assert_eq!(s.split.val.len(), 12 + 9);
        assert_eq!(s.split.train.len(), 24);
        assert!(s.split.val.iter().all(|&i| p[i] == 1 || p[i] == 3));
        assert_eq!(s.val_wells, vec![(0, 4), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(s.train_wells, vec![(0, 4), (1, 2), (2, 2), (3, 0)]);
        assert_eq!(s.missing_in_train, vec![3]);
        assert!(s.missing_in_val.is_empty());
        let e = leave_plates_out(&p, &t, &w, &[1, 8]).unwrap_err();
        assert!(e.to_string().contains("[8]"), "{e}");
        assert!(leave_plates_out(&p, &t, &w[1..], &[1]).is_err());
    }

    #[test]
    fn greedy_choice_gives_two_wells() {
        let (p, t, w) = layout();
        // Plate 3 is never chosen (treatment 3 would lose its only training well). Two of plates
        // 0..3 give treatments 1, 2 two wells each; ties → fewer cells (equal) → lower ids.
        assert_eq!(choose_val_plates(&p, &t, &w, 2).unwrap(), vec![0, 1]);
        assert_eq!(choose_val_plates(&p, &t, &w, 1).unwrap(), vec![0]);
    }
}
